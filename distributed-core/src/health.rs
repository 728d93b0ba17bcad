//! What the router knows of each follower: up or down, how far behind, how far replayed; and
//! the policy that picks one of the eligible followers.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::{Config, Freshness, WalPosition};

const UNKNOWN: u64 = u64::MAX;
/// A follower measured with no lag at all.
const CAUGHT_UP: u64 = u64::MAX - 1;

/// The shared, lock-free-to-read state of every follower: the router reads it on every
/// decision; adapters and the [monitor](crate::spawn_monitor) write it.
#[derive(Debug)]
pub struct FollowerSet {
    followers: Vec<FollowerState>,
    /// The newest leader WAL position the monitor has seen, or `UNKNOWN`.
    leader: AtomicU64,
    /// Times below are microseconds since this instant (an hour before the set was made, so
    /// that a lag measured at start-up still fits).
    epoch: Instant,
    /// When the monitor last sampled the leader's position, or `UNKNOWN`.
    leader_sampled_at: AtomicU64,
    /// When this app server last recorded a write, or 0.
    last_write: AtomicU64,
    max_lag: Duration,
    readmit_ramp: Duration,
    probe_backoff_max: Duration,
    probe_interval: Duration,
}

#[derive(Debug)]
struct FollowerState {
    name: String,
    up: AtomicBool,
    /// When it last came back up (micros since the epoch, or `UNKNOWN`), for the gradual
    /// re-admission ramp.
    readmitted_at: AtomicU64,
    /// Since when it has been behind (the last time the leader was at the position it had
    /// replayed when measured), `CAUGHT_UP`, or `UNKNOWN` before the first measurement. The lag
    /// is computed from it when asked, so it grows between measurements as it really does.
    behind_since: AtomicU64,
    /// When the leader sample its last measurement rested on was taken.
    measured_against: AtomicU64,
    /// Last replayed WAL position, or `UNKNOWN`.
    replayed: AtomicU64,
    /// Consecutive failed probes, for back-off.
    failures: AtomicU32,
}

/// Why a follower cannot serve a read right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ineligible {
    Down,
    Lagging,
}

/// The followers that can serve a read, and why the others cannot.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    pub(crate) eligible: Vec<usize>,
    pub(crate) any_up: bool,
}

impl FollowerSet {
    /// One entry per follower of `config`, all up, lag unknown.
    pub fn new(config: &Config) -> Self {
        Self {
            followers: config
                .followers()
                .iter()
                .map(|node| FollowerState {
                    name: node.name().to_owned(),
                    up: AtomicBool::new(true),
                    readmitted_at: AtomicU64::new(UNKNOWN),
                    behind_since: AtomicU64::new(UNKNOWN),
                    measured_against: AtomicU64::new(UNKNOWN),
                    replayed: AtomicU64::new(UNKNOWN),
                    failures: AtomicU32::new(0),
                })
                .collect(),
            leader: AtomicU64::new(UNKNOWN),
            epoch: {
                let now = Instant::now();
                now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
            },
            leader_sampled_at: AtomicU64::new(UNKNOWN),
            last_write: AtomicU64::new(0),
            max_lag: config.max_follower_lag(),
            readmit_ramp: config.readmit_ramp(),
            probe_backoff_max: config.probe_backoff_max(),
            probe_interval: config.probe_interval(),
        }
    }

    /// How many followers there are.
    pub fn len(&self) -> usize {
        self.followers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.followers.is_empty()
    }

    /// Follower `index`'s name, for logs and metrics.
    pub fn name(&self, index: usize) -> &str {
        self.followers.get(index).map_or("?", |f| f.name.as_str())
    }

    /// Whether follower `index` is up.
    pub fn is_up(&self, index: usize) -> bool {
        self.followers
            .get(index)
            .is_some_and(|f| f.up.load(Ordering::Acquire))
    }

    /// Takes follower `index` out of rotation (a connection to it failed). Idempotent.
    pub fn mark_down(&self, index: usize) {
        let Some(f) = self.followers.get(index) else {
            return;
        };
        f.failures.fetch_add(1, Ordering::AcqRel);
        if f.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(follower = %f.name, "follower marked down; its reads go elsewhere");
            metrics::gauge!("distributed_follower_up", "follower" => f.name.clone()).set(0.0);
            metrics::counter!("distributed_follower_down_total", "follower" => f.name.clone())
                .increment(1);
        }
    }

    /// Puts follower `index` back; it regains its share of reads gradually over the
    /// configured ramp, so a server that just restarted is not hit by every read at once.
    pub fn mark_up(&self, index: usize) {
        let Some(f) = self.followers.get(index) else {
            return;
        };
        f.failures.store(0, Ordering::Release);
        if !f.up.load(Ordering::Acquire) {
            f.readmitted_at
                .store(self.micros(Instant::now()), Ordering::Release);
            f.up.store(true, Ordering::Release);
            tracing::info!(follower = %f.name, "follower back up; re-admitting gradually");
            metrics::gauge!("distributed_follower_up", "follower" => f.name.clone()).set(1.0);
        }
    }

    /// Records a measurement of follower `index`: how far behind the leader it is, and the
    /// WAL position it has replayed.
    pub fn record(&self, index: usize, lag: Duration, replayed: WalPosition) {
        let Some(f) = self.followers.get(index) else {
            return;
        };
        let now = Instant::now();
        let was_lagging = self.lag_at(f, now).is_some_and(|lag| lag > self.max_lag);
        let since = if lag.is_zero() {
            CAUGHT_UP
        } else {
            self.micros(now.checked_sub(lag).unwrap_or(self.epoch))
        };
        f.behind_since.store(since, Ordering::Release);
        let sampled = self.leader_sampled_at.load(Ordering::Acquire);
        let basis = if sampled == UNKNOWN {
            self.micros(now)
        } else {
            sampled
        };
        f.measured_against.store(basis, Ordering::Release);
        // Positions only move forward: a measurement that arrives late must not undo a newer one.
        raise(&f.replayed, replayed);
        let lagging = lag > self.max_lag;
        if lagging && !was_lagging {
            tracing::warn!(
                follower = %f.name,
                lag_ms = lag.as_millis() as u64,
                max_ms = self.max_lag.as_millis() as u64,
                "follower lags more than allowed; skipping it until it catches up"
            );
        } else if !lagging && was_lagging {
            tracing::info!(follower = %f.name, "follower caught up; reading from it again");
        }
        metrics::gauge!("distributed_follower_lag_seconds", "follower" => f.name.clone())
            .set(lag.as_secs_f64());
    }

    /// Records that this app server's router recorded a write just now. Until a follower is
    /// measured against a leader sample taken after it, that follower is taken to be at least
    /// as far behind as the time since this write: between two probes the monitor cannot see
    /// a write, and a scope whose pin expires then must not be sent to a follower without it.
    pub fn note_write(&self) {
        self.last_write
            .fetch_max(self.micros(Instant::now()), Ordering::AcqRel);
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(CAUGHT_UP - 1)
    }

    /// Follower `f`'s lag at `now`, if it has been measured.
    fn lag_at(&self, f: &FollowerState, now: Instant) -> Option<Duration> {
        let since = f.behind_since.load(Ordering::Acquire);
        if since == UNKNOWN {
            return None;
        }
        let now = self.micros(now);
        let mut behind = if since == CAUGHT_UP {
            0
        } else {
            now.saturating_sub(since)
        };
        let wrote = self.last_write.load(Ordering::Acquire);
        if wrote != 0 && wrote > f.measured_against.load(Ordering::Acquire) {
            behind = behind.max(now.saturating_sub(wrote));
        }
        Some(Duration::from_micros(behind))
    }

    /// Records that follower `index` has replayed at least `replayed`, without a lag
    /// measurement (an on-demand check). Positions only move forward.
    pub fn observe_replayed(&self, index: usize, replayed: WalPosition) {
        if let Some(f) = self.followers.get(index) {
            raise(&f.replayed, replayed);
        }
    }

    /// Records that the leader has reached `position` (the [monitor](crate::spawn_monitor)
    /// does, at every probe). Positions only move forward.
    pub fn record_leader(&self, position: WalPosition) {
        raise(&self.leader, position);
        self.leader_sampled_at
            .store(self.micros(Instant::now()), Ordering::Release);
    }

    /// The newest leader WAL position recorded, if any: a lower bound of the leader's real
    /// position, stale by up to one probe interval.
    pub fn leader_position(&self) -> Option<WalPosition> {
        let raw = self.leader.load(Ordering::Acquire);
        (raw != UNKNOWN).then_some(WalPosition(raw))
    }

    /// Whether every follower, up or down, is known to have replayed `position`. Replay never
    /// goes backwards, so from then on every server can serve a read that needs `position`.
    pub(crate) fn all_replayed(&self, position: WalPosition) -> bool {
        self.followers.iter().all(|f| {
            let replayed = f.replayed.load(Ordering::Acquire);
            replayed != UNKNOWN && replayed >= position.0
        })
    }

    /// The follower to ask on demand whether it has reached a position: of those that could
    /// serve an ordinary read, the one known to have replayed furthest (the likeliest to have
    /// caught up); the first in configuration order on a tie.
    pub(crate) fn furthest_available(&self) -> Option<usize> {
        let now = Instant::now();
        (0..self.followers.len())
            .filter(|&i| matches!(self.eligibility(i, Freshness::Any, now), Ok(true)))
            .max_by_key(|&i| {
                let replayed = self.followers[i].replayed.load(Ordering::Acquire);
                // Unknown sorts lowest; on a tie `max_by_key` keeps the last, so prefer lower
                // indices by ranking them higher.
                (
                    if replayed == UNKNOWN { 0 } else { replayed + 1 },
                    std::cmp::Reverse(i),
                )
            })
    }

    /// How far behind follower `index` is now, if it has been measured: its last measurement,
    /// grown by the time since (a follower that was behind is still behind until measured
    /// again), and at least the time since a write recorded after that measurement.
    pub fn lag(&self, index: usize) -> Option<Duration> {
        self.lag_at(self.followers.get(index)?, Instant::now())
    }

    /// The last WAL position follower `index` was seen to have replayed, if known.
    pub fn replayed(&self, index: usize) -> Option<WalPosition> {
        let raw = self.followers.get(index)?.replayed.load(Ordering::Acquire);
        (raw != UNKNOWN).then_some(WalPosition(raw))
    }

    /// How long to wait before probing follower `index` again: the probe interval while it is
    /// up; exponential back-off with full jitter, capped, while it is down.
    pub fn next_probe_in(&self, index: usize) -> Duration {
        let failures = self
            .followers
            .get(index)
            .map_or(0, |f| f.failures.load(Ordering::Acquire));
        if failures == 0 {
            return self.probe_interval;
        }
        let exp = self
            .probe_interval
            .saturating_mul(1u32 << failures.min(16))
            .min(self.probe_backoff_max);
        // Full jitter between half and all of the back-off: probes of many app servers spread out.
        let half = exp / 2;
        half + exp
            .saturating_sub(half)
            .mul_f64(rand::rng().random::<f64>())
    }

    fn eligibility(&self, index: usize, need: Freshness, now: Instant) -> Result<bool, Ineligible> {
        let f = &self.followers[index];
        if !f.up.load(Ordering::Acquire) {
            return Err(Ineligible::Down);
        }
        if self.lag_at(f, now).is_some_and(|lag| lag > self.max_lag) {
            return Err(Ineligible::Lagging);
        }
        if let Freshness::AtLeast(position) = need {
            let replayed = f.replayed.load(Ordering::Acquire);
            if replayed == UNKNOWN || replayed < position.0 {
                return Err(Ineligible::Lagging);
            }
        }
        // Gradual re-admission: during the ramp, a follower takes a growing share of reads.
        let readmitted = f.readmitted_at.load(Ordering::Acquire);
        if readmitted != UNKNOWN {
            let elapsed = Duration::from_micros(self.micros(now).saturating_sub(readmitted));
            if elapsed < self.readmit_ramp {
                let share = elapsed.as_secs_f64() / self.readmit_ramp.as_secs_f64();
                return Ok(rand::rng().random::<f64>() < share.max(0.05));
            }
        }
        Ok(true)
    }

    /// The followers that can serve a read needing `need`.
    pub(crate) fn candidates(&self, need: Freshness) -> Candidates {
        let now = Instant::now();
        let mut out = Candidates::default();
        for index in 0..self.followers.len() {
            match self.eligibility(index, need, now) {
                Ok(true) => {
                    out.eligible.push(index);
                    out.any_up = true;
                }
                Ok(false) | Err(Ineligible::Lagging) => out.any_up = true,
                Err(Ineligible::Down) => {}
            }
        }
        out
    }
}

/// Raises a position slot to at least `position` (`UNKNOWN` counts as lowest).
fn raise(slot: &AtomicU64, position: WalPosition) {
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
        Some(if current == UNKNOWN {
            position.0
        } else {
            current.max(position.0)
        })
    });
}

/// Picks one follower among those eligible for a read.
pub trait FollowerPicker: Send + Sync {
    /// One of `eligible` (follower indices, never empty).
    fn pick(&self, eligible: &[usize]) -> usize;
}

/// Uniformly at random, like the original package.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomPicker;

impl FollowerPicker for RandomPicker {
    fn pick(&self, eligible: &[usize]) -> usize {
        eligible[rand::rng().random_range(0..eligible.len())]
    }
}

/// In turn: spreads load evenly and predictably.
#[derive(Debug, Default)]
pub struct RoundRobinPicker {
    next: AtomicUsize,
}

impl FollowerPicker for RoundRobinPicker {
    fn pick(&self, eligible: &[usize]) -> usize {
        eligible[self.next.fetch_add(1, Ordering::Relaxed) % eligible.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(followers: usize) -> FollowerSet {
        let mut b = Config::builder()
            .leader("l", "l")
            .max_follower_lag(Duration::from_secs(1))
            .readmit_ramp(Duration::from_secs(10))
            .probe_interval(Duration::from_millis(100))
            .probe_backoff_max(Duration::from_secs(5));
        for i in 0..followers {
            b = b.follower(format!("f{i}"), format!("f{i}"));
        }
        FollowerSet::new(&b.build().unwrap())
    }

    #[test]
    fn down_followers_are_skipped_and_counted() {
        let s = set(2);
        s.mark_down(0);
        let c = s.candidates(Freshness::Any);
        assert_eq!(c.eligible, vec![1]);
        s.mark_down(1);
        let c = s.candidates(Freshness::Any);
        assert!(c.eligible.is_empty() && !c.any_up);
    }

    #[tokio::test(start_paused = true)]
    async fn lagging_followers_are_skipped_until_they_catch_up() {
        let s = set(1);
        s.record(0, Duration::from_millis(1500), WalPosition(10));
        let c = s.candidates(Freshness::Any);
        assert!(c.eligible.is_empty() && c.any_up);
        s.record(0, Duration::from_millis(100), WalPosition(20));
        assert_eq!(s.candidates(Freshness::Any).eligible, vec![0]);
        assert_eq!(s.lag(0), Some(Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lag_grows_between_measurements() {
        let s = set(1); // at most 1 s behind
        s.record(0, Duration::from_millis(900), WalPosition(10));
        assert_eq!(s.candidates(Freshness::Any).eligible, vec![0]);
        // Not measured again: 200 ms later it is 1.1 s behind, not still 0.9 s.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(s.lag(0), Some(Duration::from_millis(1100)));
        assert!(s.candidates(Freshness::Any).eligible.is_empty());
        // Caught up stays caught up until measured otherwise.
        s.record(0, Duration::ZERO, WalPosition(20));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(s.lag(0), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_since_the_last_measurement_counts_as_lag() {
        let s = set(1); // at most 1 s behind
        s.record_leader(WalPosition(20));
        s.record(0, Duration::ZERO, WalPosition(20));
        tokio::time::advance(Duration::from_millis(10)).await;
        s.note_write();
        tokio::time::advance(Duration::from_millis(1100)).await;
        // The monitor has not looked since the write: the follower may not have it.
        assert_eq!(s.lag(0), Some(Duration::from_millis(1100)));
        assert!(s.candidates(Freshness::Any).eligible.is_empty());
        // A measurement against a leader sample taken after the write settles it.
        s.record_leader(WalPosition(30));
        s.record(0, Duration::ZERO, WalPosition(30));
        assert_eq!(s.lag(0), Some(Duration::ZERO));
        // Without any measurement yet (no monitor), a write changes nothing.
        let unmonitored = set(1);
        unmonitored.note_write();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(unmonitored.lag(0), None);
        assert_eq!(unmonitored.candidates(Freshness::Any).eligible, vec![0]);
    }

    #[test]
    fn causal_need_requires_the_position() {
        let s = set(2);
        s.record(0, Duration::ZERO, WalPosition(100));
        s.record(1, Duration::ZERO, WalPosition(50));
        assert_eq!(
            s.candidates(Freshness::AtLeast(WalPosition(80))).eligible,
            vec![0]
        );
        assert_eq!(
            s.candidates(Freshness::AtLeast(WalPosition(50))).eligible,
            vec![0, 1]
        );
        // A position never goes backwards, even if a stale measurement arrives late.
        s.record(0, Duration::ZERO, WalPosition(90));
        assert_eq!(s.replayed(0), Some(WalPosition(100)));
    }

    #[test]
    fn positions_known_without_a_lag_measurement() {
        let s = set(3);
        assert_eq!(s.leader_position(), None);
        s.record_leader(WalPosition(50));
        s.record_leader(WalPosition(40));
        assert_eq!(s.leader_position(), Some(WalPosition(50)));

        assert!(!s.all_replayed(WalPosition(0)), "unknown is not replayed");
        s.observe_replayed(0, WalPosition(30));
        s.observe_replayed(0, WalPosition(20));
        assert_eq!(s.replayed(0), Some(WalPosition(30)));
        assert_eq!(s.lag(0), None);
        s.observe_replayed(1, WalPosition(10));
        s.observe_replayed(2, WalPosition(30));
        assert!(s.all_replayed(WalPosition(10)));
        assert!(!s.all_replayed(WalPosition(11)));
        s.observe_replayed(9, WalPosition(1)); // ignored
    }

    #[test]
    fn the_furthest_available_follower_is_asked_on_demand() {
        let s = set(3);
        assert_eq!(s.furthest_available(), Some(0), "all unknown: the first");
        s.observe_replayed(1, WalPosition(10));
        s.observe_replayed(2, WalPosition(10));
        assert_eq!(s.furthest_available(), Some(1), "a tie: the first");
        s.observe_replayed(2, WalPosition(11));
        assert_eq!(s.furthest_available(), Some(2));
        s.mark_down(2);
        assert_eq!(s.furthest_available(), Some(1));
        s.record(1, Duration::from_secs(5), WalPosition(12));
        assert_eq!(
            s.furthest_available(),
            Some(0),
            "lagging ones are not asked"
        );
        s.mark_down(0);
        assert_eq!(s.furthest_available(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn readmission_is_gradual() {
        let s = set(1);
        s.mark_down(0);
        s.mark_up(0);
        let share = |s: &FollowerSet| {
            (0..2000)
                .filter(|_| !s.candidates(Freshness::Any).eligible.is_empty())
                .count() as f64
                / 2000.0
        };
        assert!(share(&s) < 0.15, "just back: a small share");
        tokio::time::advance(Duration::from_secs(5)).await;
        let mid = share(&s);
        assert!(
            (0.35..0.65).contains(&mid),
            "half-way: about half, got {mid}"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(share(&s), 1.0);
    }

    #[test]
    fn probe_backoff_grows_with_jitter_and_is_capped() {
        let s = set(1);
        assert_eq!(s.next_probe_in(0), Duration::from_millis(100));
        s.mark_down(0);
        let first = s.next_probe_in(0);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        for _ in 0..20 {
            s.mark_down(0);
        }
        let capped = s.next_probe_in(0);
        assert!(capped >= Duration::from_millis(2500) && capped <= Duration::from_secs(5));
        s.mark_up(0);
        assert_eq!(s.next_probe_in(0), Duration::from_millis(100));
    }

    #[test]
    fn pickers_pick_only_eligible_followers() {
        let rr = RoundRobinPicker::default();
        let picks: Vec<_> = (0..4).map(|_| rr.pick(&[1, 3])).collect();
        assert_eq!(picks, vec![1, 3, 1, 3]);
        for _ in 0..100 {
            assert!([0, 2].contains(&RandomPicker.pick(&[0, 2])));
        }
    }

    #[test]
    fn out_of_range_indices_are_ignored() {
        let s = set(1);
        s.mark_down(7);
        s.mark_up(7);
        s.record(7, Duration::ZERO, WalPosition(1));
        assert!(!s.is_up(7));
        assert_eq!(s.name(7), "?");
    }
}
