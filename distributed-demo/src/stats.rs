//! What the demo counts, and how it prints it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use distributed_core::Decision;

/// The app's side: every routed read, by target and reason.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    reads: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl ServerStats {
    pub(crate) fn count(&self, decision: Decision) {
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        *reads
            .entry((decision.target.kind(), decision.reason.label()))
            .or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The scripted client's side: what it asked and what it saw.
#[derive(Debug, Default)]
pub(crate) struct ClientStats {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) own_checks: AtomicU64,
    pub(crate) own_stale: AtomicU64,
    pub(crate) naive_checks: AtomicU64,
    pub(crate) naive_stale: AtomicU64,
    pub(crate) replays: AtomicU64,
    pub(crate) replays_logged_in: AtomicU64,
}

impl ClientStats {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Which consistency mode ran.
    pub mode: &'static str,
    /// Time since the client started.
    pub elapsed: Duration,
    /// HTTP requests sent.
    pub requests: u64,
    /// Requests that failed (a 5xx, or a broken connection).
    pub errors: u64,
    /// Reads of a session's own write, right after it.
    pub own_checks: u64,
    /// Of those, how many missed the write.
    pub own_stale: u64,
    /// The same reads sent straight to a follower, as a naive router would.
    pub naive_checks: u64,
    /// Of those, how many missed the write: the lag the library hides.
    pub naive_stale: u64,
    /// Requests replaying a logged-out session's cookie.
    pub replays: u64,
    /// Of those, how many were still logged in.
    pub replays_logged_in: u64,
    /// Routed reads by (target, reason).
    pub reads: BTreeMap<(&'static str, &'static str), u64>,
}

impl Report {
    pub(crate) fn new(
        mode: &'static str,
        elapsed: Duration,
        client: &ClientStats,
        server: &ServerStats,
    ) -> Self {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Self {
            mode,
            elapsed,
            requests: get(&client.requests),
            errors: get(&client.errors),
            own_checks: get(&client.own_checks),
            own_stale: get(&client.own_stale),
            naive_checks: get(&client.naive_checks),
            naive_stale: get(&client.naive_stale),
            replays: get(&client.replays),
            replays_logged_in: get(&client.replays_logged_in),
            reads: server.snapshot(),
        }
    }

    /// Routed reads that went to `target` ("leader" or "follower").
    pub fn reads_on(&self, target: &str) -> u64 {
        self.reads
            .iter()
            .filter(|((t, _), _)| *t == target)
            .map(|(_, n)| n)
            .sum()
    }

    /// The header of [`row`](Self::row).
    pub fn header() -> String {
        format!(
            "{:>5} {:>8} {:>6} | {:>8} {:>8} | {:<46} | {:>11} {:>11}",
            "t",
            "requests",
            "errors",
            "follower",
            "leader",
            "leader reads by reason",
            "own stale",
            "naive stale"
        )
    }

    /// One line of the live table.
    pub fn row(&self) -> String {
        let mut reasons = String::new();
        for ((target, reason), n) in &self.reads {
            if *target == "leader" {
                let _ = write!(reasons, "{reason} {n}  ");
            }
        }
        format!(
            "{:>4}s {:>8} {:>6} | {:>8} {:>8} | {:<46} | {:>5} of {:<3} {:>4} of {:<4}",
            self.elapsed.as_secs(),
            self.requests,
            self.errors,
            self.reads_on("follower"),
            self.reads_on("leader"),
            reasons.trim_end(),
            self.own_stale,
            self.own_checks,
            self.naive_stale,
            self.naive_checks,
        )
    }

    /// The closing summary.
    pub fn summary(&self) -> String {
        let routed = self.reads_on("follower") + self.reads_on("leader");
        let share = if routed == 0 {
            0.0
        } else {
            100.0 * self.reads_on("follower") as f64 / routed as f64
        };
        format!(
            "mode: {}\n\
             routed reads: {routed}, {:.0}% served by followers\n\
             a naive router reading the follower would have missed {} of {} own writes\n\
             logged-out cookies replayed: {} of {} still logged in\n\
             server errors: {}\n\
             own-write stale reads: {} of {}",
            self.mode,
            share,
            self.naive_stale,
            self.naive_checks,
            self.replays_logged_in,
            self.replays,
            self.errors,
            self.own_stale,
            self.own_checks,
        )
    }

    /// Whether the run showed what it must: no stale own write, no error, no surviving
    /// logout, and followers serving reads.
    pub fn passed(&self) -> bool {
        self.own_checks > 0
            && self.own_stale == 0
            && self.errors == 0
            && self.replays_logged_in == 0
            && self.reads_on("follower") > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distributed_core::Reason;

    #[test]
    fn counts_and_judges() {
        let server = ServerStats::default();
        server.count(Decision::follower(0, Reason::HealthyFollower));
        server.count(Decision::leader(Reason::RecentWrite));
        server.count(Decision::leader(Reason::RecentWrite));
        let client = ClientStats::default();
        ClientStats::add(&client.own_checks);
        let report = Report::new("time", Duration::from_secs(3), &client, &server);
        assert_eq!(report.reads_on("follower"), 1);
        assert_eq!(report.reads_on("leader"), 2);
        assert!(report.passed());
        assert!(report.row().contains("recent_write 2"));
        assert!(report.summary().ends_with("own-write stale reads: 0 of 1"));
        ClientStats::add(&client.own_stale);
        assert!(!Report::new("time", Duration::ZERO, &client, &server).passed());
    }
}
