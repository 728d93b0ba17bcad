//! Session versions: a hybrid logical clock in microseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How far ahead of this server's wall clock an observed version may be and still be adopted.
/// A value from further ahead (a corrupt cache entry, a badly skewed server) is ignored, so it
/// cannot push every later version into the far future.
const MAX_OBSERVED_AHEAD_US: u64 = 3_600 * 1_000_000;

/// Hands out versions that only grow: the wall clock in microseconds, or one more than the
/// last version handed out or observed, whichever is larger.
///
/// Within one process, a later save always gets a higher version. Across app servers,
/// versions follow wall-clock order, and observing the version of a loaded session (as every
/// request that modifies a session first loads it) puts the next save after it even under
/// clock skew.
#[derive(Debug, Default)]
pub(crate) struct VersionClock {
    last: AtomicU64,
}

impl VersionClock {
    pub(crate) fn next(&self) -> u64 {
        let now = now_us();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    pub(crate) fn observe(&self, version: u64) {
        if version <= now_us().saturating_add(MAX_OBSERVED_AHEAD_US) {
            self.last.fetch_max(version, Ordering::AcqRel);
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_when_called_faster_than_the_clock() {
        let clock = VersionClock::default();
        let mut last = 0;
        for _ in 0..10_000 {
            let v = clock.next();
            assert!(v > last);
            last = v;
        }
    }

    #[test]
    fn observing_moves_ahead_but_not_into_the_far_future() {
        let clock = VersionClock::default();
        let ahead = now_us() + 10_000_000;
        clock.observe(ahead);
        assert!(clock.next() > ahead);
        let before = clock.next();
        clock.observe(u64::MAX - 5);
        let after = clock.next();
        assert!(after > before && after < ahead + 20_000_000);
    }

    #[test]
    fn concurrent_callers_never_share_a_version() {
        let clock = std::sync::Arc::new(VersionClock::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..5000).map(|_| clock.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
