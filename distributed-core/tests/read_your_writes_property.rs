//! The promise, as a property over a simulated leader and lagging followers: for any
//! interleaving of writes and reads by many scopes, with followers going down and up and the
//! pin cache failing lookups, no scope ever reads a follower that has not yet applied that
//! scope's own last write — as long as the real lag stays within the configured window.
//!
//! Time is tokio's paused clock, so a case of many seconds runs in microseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use distributed_core::{Config, DistributedRouter, Router, Scope, SessionCachedRouter, Target};
use proptest::prelude::*;

use common::FlakyLookups;
use tokio::time::Instant;

const WINDOW_MS: u64 = 1000;
const SCOPES: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    /// A request of `scope` that writes, then reads `reads` times.
    Write { scope: usize, reads: usize },
    /// A request of `scope` that only reads.
    Read { scope: usize },
    /// A request with no scope key yet, that writes then reads.
    AnonymousWrite,
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
        6 => (0..SCOPES).prop_map(|scope| Op::Read { scope }),
        1 => Just(Op::AnonymousWrite),
        4 => (0..WINDOW_MS + 300).prop_map(|ms| Op::Wait { ms }),
        1 => (0..3usize).prop_map(|index| Op::Toggle { index }),
        1 => any::<bool>().prop_map(|failing| Op::CacheLookups { failing }),
    ]
}

/// The leader's history of one scope's writes, and what each follower has applied.
struct World {
    start: Instant,
    /// Per follower: its apply delay.
    lags: Vec<Duration>,
    /// Per scope: commit times of its writes, oldest first.
    commits: Vec<Vec<Duration>>,
}

impl World {
    fn now(&self) -> Duration {
        Instant::now() - self.start
    }

    /// How many of `scope`'s writes follower `index` has applied by now.
    fn applied(&self, index: usize, scope: usize) -> usize {
        let now = self.now();
        self.commits[scope]
            .iter()
            .filter(|t| **t + self.lags[index] <= now)
            .count()
    }

    fn check_read(&self, target: Target, scope: usize, own_writes: usize) -> Result<(), String> {
        if let Target::Follower(index) = target {
            let applied = self.applied(index, scope);
            if applied < own_writes {
                return Err(format!(
                    "scope {scope} read follower {index} (lag {:?}) at {:?}: it has applied {applied} of its {own_writes} writes",
                    self.lags[index],
                    self.now()
                ));
            }
        }
        Ok(())
    }
}

fn run_case(lags_ms: Vec<u64>, ops: Vec<Op>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut builder = Config::builder()
            .leader("leader", "leader")
            .lag_window(Duration::from_millis(WINDOW_MS))
            .readmit_ramp(Duration::from_millis(200));
        for i in 0..lags_ms.len() {
            builder = builder.follower(format!("f{i}"), format!("f{i}"));
        }
        let config = builder.build().unwrap();
        let cache = Arc::new(FlakyLookups::default());
        let router = DistributedRouter::new(
            config.clone(),
            SessionCachedRouter::new(cache.clone(), config.lag_window()),
        );
        let mut world = World {
            start: Instant::now(),
            lags: lags_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            commits: vec![Vec::new(); SCOPES],
        };
        for op in ops {
            match op {
                Op::Write { scope, reads } => {
                    let request = Scope::new(format!("scope-{scope}"));
                    assert_eq!(
                        router.route_write(Some(&request), None).target,
                        Target::Leader
                    );
                    let now = world.now();
                    world.commits[scope].push(now);
                    router
                        .record_write(Some(&request), None, None)
                        .await
                        .unwrap();
                    for _ in 0..reads {
                        let d = router.route_read(Some(&request), None).await;
                        world.check_read(d.target, scope, world.commits[scope].len())?;
                    }
                }
                Op::Read { scope } => {
                    let request = Scope::new(format!("scope-{scope}"));
                    let d = router.route_read(Some(&request), None).await;
                    world.check_read(d.target, scope, world.commits[scope].len())?;
                }
                Op::AnonymousWrite => {
                    let request = Scope::anonymous();
                    router
                        .record_write(Some(&request), None, None)
                        .await
                        .unwrap();
                    let d = router.route_read(Some(&request), None).await;
                    if let Target::Follower(index) = d.target {
                        return Err(format!(
                            "an anonymous write was followed by a read of follower {index}"
                        ));
                    }
                }
                Op::Wait { ms } => tokio::time::advance(Duration::from_millis(ms)).await,
                Op::Toggle { index } => {
                    if index < lags_ms.len() {
                        if router.followers().is_up(index) {
                            router.followers().mark_down(index);
                        } else {
                            router.followers().mark_up(index);
                        }
                    }
                }
                Op::CacheLookups { failing } => cache.set_failing(failing),
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn no_scope_reads_a_follower_behind_its_own_last_write(
        lags_ms in prop::collection::vec(0..=WINDOW_MS, 0..=3),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_case(lags_ms, ops).map_err(TestCaseError::fail)?;
    }
}

/// The property can fail: with followers lagging past the window, it does.
#[test]
fn the_property_catches_a_lag_longer_than_the_window() {
    let ops = vec![
        Op::Write { scope: 0, reads: 0 },
        Op::Wait { ms: WINDOW_MS },
        Op::Read { scope: 0 },
    ];
    let outcome = run_case(vec![WINDOW_MS + 500], ops);
    assert!(
        outcome.is_err(),
        "a follower 1.5 s behind a 1 s window must be caught"
    );
}
