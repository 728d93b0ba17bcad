//! The health and lag monitor: probes every follower at an interval, marks it down when it
//! does not answer (probing again with back-off), up when it answers again, and measures how
//! far behind the leader it is.
//!
//! Lag is measured in the leader's own terms, without trusting any clock but ours: the monitor
//! keeps a short history of when it saw the leader at each WAL position; a follower that has
//! replayed position `p` is as far behind as the time since the leader was last seen at `p` or
//! earlier. That over-estimates by at most one probe interval, never under-estimates, so a
//! follower skipped for lagging really was behind.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::BoxError;
use crate::{Router, WalPosition, spawn_supervised};

/// What the monitor asks of a database adapter: two cheap queries.
///
/// An `async_trait`, so that adapters can hand the monitor an `Arc<dyn NodeProbe>`.
#[async_trait]
pub trait NodeProbe: Send + Sync {
    /// The leader's current WAL position (`pg_current_wal_lsn()`).
    async fn leader_position(&self) -> Result<WalPosition, BoxError>;
    /// The WAL position follower `index` has replayed (`pg_last_wal_replay_lsn()`). An error
    /// means the follower is unreachable.
    async fn follower_position(&self, index: usize) -> Result<WalPosition, BoxError>;
}

/// Runs the monitor's tasks; dropping it (or calling [`stop`](MonitorHandle::stop)) stops them.
#[derive(Debug)]
pub struct MonitorHandle {
    tasks: Vec<JoinHandle<()>>,
}

impl MonitorHandle {
    /// Stops the monitor. (The newest leader position it saw is the router's
    /// [`FollowerSet::leader_position`](crate::FollowerSet::leader_position).)
    pub fn stop(self) {}
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The shortest probe interval [`spawn_monitor`] uses; a shorter one (zero, say) is raised to it.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// Starts monitoring `router`'s followers through `probe`, every
/// [`Config::probe_interval`](crate::Config::probe_interval) (passed as `interval`; at least
/// 1 ms). Each probe waits at most four intervals (at least 1 s) for its answer.
///
/// The probing tasks are [supervised](crate::spawn_supervised): a panic in one (in a probe,
/// say) is logged, counted and the task restarted, so the followers' health never silently
/// stops being watched.
///
/// Must be called inside a tokio runtime.
pub fn spawn_monitor<R, P>(router: Arc<R>, probe: Arc<P>, interval: Duration) -> MonitorHandle
where
    R: Router + ?Sized + 'static,
    P: NodeProbe + ?Sized + 'static,
{
    let history = Arc::new(LeaderHistory::default());
    // A zero interval would make tokio's ticker panic; a huge one must not overflow the timeout.
    let interval = interval.max(MIN_PROBE_INTERVAL);
    let timeout = interval.saturating_mul(4).max(Duration::from_secs(1));
    let mut tasks = Vec::with_capacity(router.followers().len() + 1);
    {
        let (router, probe, history) = (router.clone(), probe.clone(), history.clone());
        tasks.push(spawn_supervised("leader_position_probe", move || {
            let (router, probe, history) = (router.clone(), probe.clone(), history.clone());
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    match tokio::time::timeout(timeout, probe.leader_position()).await {
                        Ok(Ok(position)) => {
                            history.observe(position, Instant::now());
                            // Causal mode's monotonic reads: where a read of the leader is known to be.
                            router.followers().record_leader(position);
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "leader position probe failed"),
                        Err(_) => tracing::debug!("leader position probe timed out"),
                    }
                }
            }
        }));
    }
    for index in 0..router.followers().len() {
        let (router, probe, history) = (router.clone(), probe.clone(), history.clone());
        tasks.push(spawn_supervised("follower_probe", move || {
            let (router, probe, history) = (router.clone(), probe.clone(), history.clone());
            async move {
                loop {
                    let outcome =
                        tokio::time::timeout(timeout, probe.follower_position(index)).await;
                    let followers = router.followers();
                    match outcome {
                        Ok(Ok(replayed)) => {
                            followers.mark_up(index);
                            if let Some(lag) = history.lag_of(replayed, Instant::now()) {
                                followers.record(index, lag, replayed);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(follower = followers.name(index), error = %e, "probe failed");
                            followers.mark_down(index);
                        }
                        Err(_) => followers.mark_down(index),
                    }
                    tokio::time::sleep(followers.next_probe_in(index)).await;
                }
            }
        }));
    }
    MonitorHandle { tasks }
}

/// When the monitor last saw the leader at each recent WAL position.
#[derive(Debug, Default)]
pub(crate) struct LeaderHistory {
    /// Positions strictly increasing, each with when it was first and last seen.
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    position: WalPosition,
    first_seen: Instant,
    last_seen: Instant,
}

impl LeaderHistory {
    const CAPACITY: usize = 512;

    pub(crate) fn observe(&self, position: WalPosition, now: Instant) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        match samples.back_mut() {
            Some(last) if last.position == position => last.last_seen = now,
            Some(last) if last.position > position => {} // a late answer; ignore it
            _ => {
                if samples.len() == Self::CAPACITY {
                    samples.pop_front();
                }
                samples.push_back(Sample {
                    position,
                    first_seen: now,
                    last_seen: now,
                });
            }
        }
    }

    /// How far behind a follower that replayed `replayed` is; `None` before the leader's
    /// first sample.
    pub(crate) fn lag_of(&self, replayed: WalPosition, now: Instant) -> Option<Duration> {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = samples.back()?;
        if replayed >= latest.position {
            return Some(Duration::ZERO);
        }
        // The leader was last seen at or before `replayed` then; or, when it is older than the
        // whole history, it has been ahead at least since the first sample.
        let since = match samples.iter().rev().find(|s| s.position <= replayed) {
            Some(sample) => sample.last_seen,
            None => samples.front()?.first_seen,
        };
        Some(now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::{Config, DistributedRouter, MemoryCache, Reason, SessionCachedRouter};

    #[test]
    fn lag_is_time_since_the_leader_was_last_at_the_replayed_position() {
        let h = LeaderHistory::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(h.lag_of(WalPosition(1), t0), None);
        h.observe(WalPosition(10), at(0));
        h.observe(WalPosition(10), at(900)); // idle leader
        h.observe(WalPosition(20), at(1000));
        h.observe(WalPosition(30), at(2000));
        h.observe(WalPosition(25), at(2100)); // late answer, ignored
        assert_eq!(h.lag_of(WalPosition(30), at(2500)), Some(Duration::ZERO));
        assert_eq!(
            h.lag_of(WalPosition(10), at(2500)),
            Some(Duration::from_millis(1600))
        );
        assert_eq!(
            h.lag_of(WalPosition(25), at(2500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            h.lag_of(WalPosition(5), at(2500)),
            Some(Duration::from_millis(2500))
        );
    }

    /// A fake topology: the leader is at `leader`, follower 0 replays `behind` less, and can
    /// be switched off.
    struct FakeProbe {
        leader: AtomicU64,
        behind: AtomicU64,
        follower_down: AtomicBool,
    }

    #[async_trait]
    impl NodeProbe for FakeProbe {
        async fn leader_position(&self) -> Result<WalPosition, BoxError> {
            Ok(WalPosition(self.leader.load(Ordering::SeqCst)))
        }
        async fn follower_position(&self, _: usize) -> Result<WalPosition, BoxError> {
            if self.follower_down.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            let leader = self.leader.load(Ordering::SeqCst);
            Ok(WalPosition(leader - self.behind.load(Ordering::SeqCst)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn marks_down_readmits_and_skips_laggards() {
        let config = Config::builder()
            .leader("l", "l")
            .follower("f", "f")
            .lag_window(Duration::from_secs(1))
            .probe_interval(Duration::from_millis(100))
            .readmit_ramp(Duration::from_millis(100))
            .build()
            .unwrap();
        let interval = config.probe_interval();
        let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
        let router = Arc::new(DistributedRouter::new(config, pins));
        let probe = Arc::new(FakeProbe {
            leader: AtomicU64::new(100),
            behind: AtomicU64::new(0),
            follower_down: AtomicBool::new(false),
        });
        let monitor = spawn_monitor(router.clone(), probe.clone(), interval);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(router.followers().lag(0), Some(Duration::ZERO));
        assert_eq!(router.followers().leader_position(), Some(WalPosition(100)));

        probe.follower_down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!router.followers().is_up(0));
        assert_eq!(
            router.route_read(None, None).await.reason,
            Reason::NoHealthyFollower
        );

        probe.follower_down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(router.followers().is_up(0));
        assert_eq!(
            router.route_read(None, None).await.reason,
            Reason::HealthyFollower
        );

        // The leader moves on; the follower stays 10 behind for 2 s: more than the 1 s allowed.
        probe.behind.store(10, Ordering::SeqCst);
        for _ in 0..20 {
            probe.leader.fetch_add(1, Ordering::SeqCst);
            probe.behind.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(router.followers().lag(0).unwrap() > Duration::from_secs(1));
        assert_eq!(
            router.route_read(None, None).await.reason,
            Reason::FollowersLagging
        );
        monitor.stop();
    }

    /// Panics on its first `panics` calls of each kind, then answers like [`FakeProbe`].
    struct PanickyProbe {
        panics: AtomicU64,
        calls: AtomicU64,
    }

    #[async_trait]
    impl NodeProbe for PanickyProbe {
        async fn leader_position(&self) -> Result<WalPosition, BoxError> {
            Ok(WalPosition(100))
        }
        async fn follower_position(&self, _: usize) -> Result<WalPosition, BoxError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("a probe bug");
            }
            Err("connection refused".into())
        }
    }

    fn one_follower(
        interval: Duration,
    ) -> Arc<DistributedRouter<SessionCachedRouter<MemoryCache>>> {
        let config = Config::builder()
            .leader("l", "l")
            .follower("f", "f")
            .probe_interval(interval)
            .build()
            .unwrap();
        let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
        Arc::new(DistributedRouter::new(config, pins))
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_probe_restarts_its_task_instead_of_ending_the_watch() {
        let router = one_follower(Duration::from_millis(100));
        let probe = Arc::new(PanickyProbe {
            panics: AtomicU64::new(2),
            calls: AtomicU64::new(0),
        });
        let monitor = spawn_monitor(router.clone(), probe.clone(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Two panicking runs, then probes that find the follower down, as they should.
        assert!(probe.calls.load(Ordering::SeqCst) >= 3);
        assert!(!router.followers().is_up(0));
        monitor.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_intervals_neither_panic_nor_stop_the_probes() {
        for interval in [
            Duration::ZERO,
            Duration::from_nanos(1),
            crate::MAX_TIMING,
            Duration::MAX,
        ] {
            let router = one_follower(Duration::from_millis(100));
            let probe = Arc::new(PanickyProbe {
                panics: AtomicU64::new(0),
                calls: AtomicU64::new(0),
            });
            let monitor = spawn_monitor(router.clone(), probe.clone(), interval);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(probe.calls.load(Ordering::SeqCst) >= 1, "{interval:?}");
            assert!(!router.followers().is_up(0), "{interval:?}");
            monitor.stop();
        }
    }
}
