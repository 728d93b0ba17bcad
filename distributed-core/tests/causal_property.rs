//! Causal mode's promises, as properties over a simulated leader and followers whose apply
//! delays are arbitrary — up to five times the lag window, which time mode cannot survive:
//!
//! 1. Read-your-writes: no scope reads a follower that has not yet replayed its own last write,
//!    nor does a job reading with that scope's consistency token.
//! 2. Monotonic reads, to the documented precision: a read (forced to the leader or not) never
//!    sees less than what the scope's earlier reads were *known* to have seen — the server's position as last measured
//!    by the monitor — counting every earlier read of the same request, and the first read of
//!    each earlier request (the one whose position is stored).
//!
//! The real monitor (`spawn_monitor`) measures the simulated servers every 100 ms; followers
//! go down and up and the cache fails lookups along the way. Time is tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{
    BoxError, CausalRouter, CausalTracker, Config, DistributedRouter, NodeProbe, Router, Scope,
    SessionCachedRouter, Target, WalPosition, force_leader, spawn_monitor,
};
use proptest::prelude::*;

use common::FlakyLookups;
use tokio::time::Instant;

const WINDOW_MS: u64 = 1000;
const PROBE_INTERVAL_MS: u64 = 100;
const SCOPES: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    /// A request of `scope` that writes, then reads `reads` times.
    Write { scope: usize, reads: usize },
    /// A request of `scope` that reads `reads` times, the first inside `force_leader` when
    /// `forced`.
    Read {
        scope: usize,
        reads: usize,
        forced: bool,
    },
    /// A job with no session reads with the consistency token of `scope`.
    Job { scope: usize },
    /// Time passes.
    Wait { ms: u64 },
    /// Follower `index` goes down or comes back.
    Toggle { index: usize },
    /// The cache starts or stops failing lookups.
    CacheLookups { failing: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SCOPES, 0..3usize).prop_map(|(scope, reads)| Op::Write { scope, reads }),
        6 => (0..SCOPES, 1..4usize, prop::bool::weighted(0.1))
            .prop_map(|(scope, reads, forced)| Op::Read { scope, reads, forced }),
        1 => (0..SCOPES).prop_map(|scope| Op::Job { scope }),
        4 => (0..WINDOW_MS).prop_map(|ms| Op::Wait { ms }),
        1 => (0..3usize).prop_map(|index| Op::Toggle { index }),
        1 => any::<bool>().prop_map(|failing| Op::CacheLookups { failing }),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Causal mode; `monotonic` reads on or off; an on-demand check or not.
    Causal { monotonic: bool, probe: bool },
    /// Time mode, for the test that shows the property can fail.
    Time,
}

/// The leader's log over time and the followers' apply delays.
struct World {
    start: Instant,
    delays: Vec<Duration>,
    /// (when, position) of every commit, in order; the log starts at position 1.
    log: Vec<(Duration, u64)>,
    down: Vec<bool>,
}

impl World {
    fn now(&self) -> Duration {
        Instant::now() - self.start
    }

    fn leader(&self) -> u64 {
        self.log.last().map_or(1, |(_, p)| *p)
    }

    /// What follower `index` has replayed by now: the leader's position `delay` ago.
    fn replayed(&self, index: usize) -> u64 {
        let Some(seen) = self.now().checked_sub(self.delays[index]) else {
            return 1;
        };
        self.log
            .iter()
            .rev()
            .find(|(at, _)| *at <= seen)
            .map_or(1, |(_, p)| *p)
    }

    fn commit(&mut self, bytes: u64) -> u64 {
        let position = self.leader() + bytes;
        let now = self.now();
        self.log.push((now, position));
        position
    }

    /// What a read of `target` sees now.
    fn seen(&self, target: Target) -> u64 {
        match target {
            Target::Leader => self.leader(),
            Target::Follower(index) => self.replayed(index),
        }
    }
}

/// The monitor's view of the world.
struct WorldProbe(Arc<Mutex<World>>);

#[async_trait]
impl NodeProbe for WorldProbe {
    async fn leader_position(&self) -> Result<WalPosition, BoxError> {
        Ok(WalPosition(self.0.lock().unwrap().leader()))
    }
    async fn follower_position(&self, index: usize) -> Result<WalPosition, BoxError> {
        let world = self.0.lock().unwrap();
        if world.down[index] {
            return Err("connection refused".into());
        }
        Ok(WalPosition(world.replayed(index)))
    }
}

enum Routers {
    Causal(Arc<CausalRouter<Arc<FlakyLookups>>>),
    Time(Arc<DistributedRouter<SessionCachedRouter<Arc<FlakyLookups>>>>),
}

impl Routers {
    fn router(&self) -> Arc<dyn Router> {
        match self {
            Routers::Causal(r) => r.clone(),
            Routers::Time(r) => r.clone(),
        }
    }
}

/// Per scope: the position of its last write, and the monotonic floor of its later requests.
#[derive(Default, Clone, Copy)]
struct ScopeState {
    last_write: u64,
    floor: u64,
}

struct Case {
    world: Arc<Mutex<World>>,
    routers: Routers,
    router: Arc<dyn Router>,
    cache: Arc<FlakyLookups>,
    scopes: Vec<ScopeState>,
    check_monotonic: bool,
}

impl Case {
    /// Runs the reads of one request and checks them.
    async fn reads(
        &mut self,
        scope: usize,
        request: &Scope,
        reads: usize,
        forced: bool,
    ) -> Result<(), String> {
        let mut request_floor = 0;
        for n in 0..reads {
            let route = self.router.route_read(Some(request), None);
            let d = if forced && n == 0 {
                force_leader(route).await
            } else {
                route.await
            };
            let state = self.scopes[scope];
            let seen = self.world.lock().unwrap().seen(d.target);
            if seen < state.last_write {
                return Err(format!(
                    "scope {scope} read {:?} ({}) at {seen}, before its own write at {}",
                    d.target, d.reason, state.last_write
                ));
            }
            let floor = state.floor.max(request_floor);
            if self.check_monotonic && seen < floor {
                return Err(format!(
                    "scope {scope}, read {n} of a request: {:?} ({}) at {seen}, behind {floor} already seen",
                    d.target, d.reason
                ));
            }
            // What an adapter does when the read's connection is released: its server's
            // position after the read, which here is exactly what it returned.
            self.router
                .record_read(request, None, d, Some(WalPosition(seen)))
                .await;
            request_floor = request_floor.max(seen);
        }
        self.router.end_request(request).await;
        // What the request saw is stored for later requests, unless the cache could not be
        // asked in this request.
        if reads > 0 && !self.cache.is_failing() {
            let state = &mut self.scopes[scope];
            state.floor = state.floor.max(request_floor);
        }
        Ok(())
    }

    async fn step(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Write { scope, reads } => {
                let request = Scope::new(format!("scope-{scope}"));
                assert_eq!(
                    self.router.route_write(Some(&request), None).target,
                    Target::Leader
                );
                let position = self.world.lock().unwrap().commit(8 + scope as u64);
                let before = self.scopes[scope];
                self.scopes[scope].last_write = position;
                let recorded = self
                    .router
                    .record_write(Some(&request), None, Some(WalPosition(position)))
                    .await;
                self.reads(scope, &request, reads, false).await?;
                if recorded.is_err() {
                    // The cache could not take the position (its lookups fail): the rest of
                    // the request reads the leader, later requests are not promised the write.
                    self.scopes[scope].last_write = before.last_write;
                }
            }
            Op::Read {
                scope,
                reads,
                forced,
            } => {
                let request = Scope::new(format!("scope-{scope}"));
                self.reads(scope, &request, reads, forced).await?;
            }
            Op::Job { scope } => {
                let Routers::Causal(router) = &self.routers else {
                    return Ok(());
                };
                let issuing = Scope::new(format!("scope-{scope}"));
                // A request that cannot reach the cache cannot issue a token.
                let Ok(token) = router.token(&issuing).await else {
                    return Ok(());
                };
                let payload = token.to_string();
                let job = Scope::from_token(&payload.parse().unwrap());
                let d = self.router.route_read(Some(&job), None).await;
                let seen = self.world.lock().unwrap().seen(d.target);
                let wrote = self.scopes[scope].last_write;
                if seen < wrote {
                    return Err(format!(
                        "a job with scope {scope}'s token {payload} read {:?} at {seen}, before the write at {wrote}",
                        d.target
                    ));
                }
            }
            Op::Wait { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Op::Toggle { index } => {
                let mut world = self.world.lock().unwrap();
                if index < world.down.len() {
                    world.down[index] = !world.down[index];
                    let followers = self.router.followers();
                    if world.down[index] {
                        followers.mark_down(index);
                    }
                }
            }
            Op::CacheLookups { failing } => self.cache.set_failing(failing),
        }
        Ok(())
    }
}

fn run_case(mode: Mode, delays_ms: Vec<u64>, ops: Vec<Op>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut builder = Config::builder()
            .leader("leader", "leader")
            .lag_window(Duration::from_millis(WINDOW_MS))
            // Followers far behind still serve reads: causal mode must not need the skip.
            .max_follower_lag(Duration::from_secs(3600))
            .probe_interval(Duration::from_millis(PROBE_INTERVAL_MS))
            .readmit_ramp(Duration::from_millis(200));
        for i in 0..delays_ms.len() {
            builder = builder.follower(format!("f{i}"), format!("f{i}"));
        }
        let config = builder.build().unwrap();
        let world = Arc::new(Mutex::new(World {
            start: Instant::now(),
            delays: delays_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            log: Vec::new(),
            down: vec![false; delays_ms.len()],
        }));
        let probe = Arc::new(WorldProbe(world.clone()));
        let cache = Arc::new(FlakyLookups::default());
        let (routers, check_monotonic) = match mode {
            Mode::Causal {
                monotonic,
                probe: on_demand,
            } => {
                let tracker = CausalTracker::new(cache.clone(), config.lag_window())
                    .monotonic_reads(monotonic);
                let mut router = CausalRouter::new(config.clone(), tracker);
                if on_demand {
                    router = router.probe_on_demand(probe.clone());
                }
                (Routers::Causal(Arc::new(router)), true)
            }
            Mode::Time => {
                let pins = SessionCachedRouter::new(cache.clone(), config.lag_window());
                let router = DistributedRouter::new(config.clone(), pins);
                (Routers::Time(Arc::new(router)), false)
            }
        };
        let router = routers.router();
        let monitor = spawn_monitor(router.clone(), probe, config.probe_interval());
        // Let the monitor take its first measurements.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut case = Case {
            world,
            routers,
            router,
            cache,
            scopes: vec![ScopeState::default(); SCOPES],
            check_monotonic,
        };
        for op in ops {
            case.step(op).await?;
        }
        monitor.stop();
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn causal_mode_reads_own_writes_and_monotonically_at_any_lag(
        delays_ms in prop::collection::vec(0..=5 * WINDOW_MS, 0..=3),
        probe in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_case(Mode::Causal { monotonic: true, probe }, delays_ms, ops)
            .map_err(TestCaseError::fail)?;
    }
}

/// The properties can fail. Read-your-writes: time mode with a follower lagging past the window.
#[test]
fn time_mode_fails_read_your_writes_past_the_window() {
    let ops = vec![
        Op::Write { scope: 0, reads: 0 },
        Op::Wait { ms: WINDOW_MS },
        Op::Read {
            scope: 0,
            reads: 1,
            forced: false,
        },
    ];
    let lagging = vec![3 * WINDOW_MS];
    assert!(run_case(Mode::Time, lagging.clone(), ops.clone()).is_err());
    let causal = Mode::Causal {
        monotonic: true,
        probe: false,
    };
    assert_eq!(run_case(causal, lagging, ops), Ok(()));
}

/// Monotonic reads: with them off, a scope that read the up-to-date follower goes on to read
/// the one three seconds behind.
#[test]
fn without_monotonic_reads_a_scope_goes_back_in_time() {
    let mut ops = vec![Op::Write { scope: 1, reads: 0 }, Op::Wait { ms: 500 }];
    ops.extend((0..40).map(|_| Op::Read {
        scope: 0,
        reads: 1,
        forced: false,
    }));
    let delays = vec![0, 3 * WINDOW_MS];
    let off = Mode::Causal {
        monotonic: false,
        probe: false,
    };
    let outcome = run_case(off, delays.clone(), ops.clone());
    assert!(outcome.is_err(), "{outcome:?}");
    let on = Mode::Causal {
        monotonic: true,
        probe: false,
    };
    assert_eq!(run_case(on, delays, ops), Ok(()));
}
