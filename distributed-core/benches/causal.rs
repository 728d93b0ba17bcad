//! Causal mode against time mode, on the same simulated workload: the share of reads that
//! followers serve, and how many reads miss the reader's own write.
//!
//! Many scopes make requests at random (Poisson) times; every k-th request writes (a form
//! post, answered with a redirect), the others read once (page loads, the redirect's target
//! among them). Two followers apply
//! the leader's log 200 ms late; the lag window is 2 s. The real router and the real monitor
//! (`spawn_monitor`) run against the simulated servers on tokio's paused clock, so a minute of
//! traffic takes well under a second and the numbers are exact, not timings.
//!
//! Routers compared, each on the same request sequence (same seed):
//! - naive: always a follower (the control: it must show stale reads);
//! - time: the leader for the lag window after a write (`SessionCachedRouter`);
//! - causal: `CausalRouter`, monitor every 100 ms; also with an on-demand check, with the
//!   monitor every 1 s, and with monotonic reads off.
//!
//! `cargo bench -p distributed-core --bench causal`

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)] // a bench binary; set-up failing is fatal

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{
    BoxError, Cache, CacheError, CausalRouter, CausalTracker, Config, DistributedRouter, Freshness,
    MemoryCache, NodeProbe, RecentlyUpdated, Router, Scope, SessionCachedRouter, Subject, Target,
    WalPosition, spawn_monitor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const APPLY_DELAY: Duration = Duration::from_millis(200);
const LAG_WINDOW: Duration = Duration::from_secs(2);
const FOLLOWERS: usize = 2;
const SEED: u64 = 6;

#[derive(Debug, Clone, Copy)]
struct Workload {
    scopes: usize,
    /// Mean time between two requests of one scope.
    interval: Duration,
    /// Every k-th request writes.
    k: u64,
    /// Simulated traffic, after a warm-up of twice the lag window.
    duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Naive,
    Time,
    Causal {
        interval: Duration,
        on_demand: bool,
        monotonic: bool,
    },
}

impl Mode {
    const CAUSAL: Mode = Mode::Causal {
        interval: Duration::from_millis(100),
        on_demand: false,
        monotonic: true,
    };

    fn label(self) -> String {
        match self {
            Mode::Naive => "naive (always a follower)".to_owned(),
            Mode::Time => "time mode (2 s window)".to_owned(),
            Mode::Causal {
                interval,
                on_demand,
                monotonic,
            } => format!(
                "causal, monitor every {} ms{}{}",
                interval.as_millis(),
                if on_demand { ", on-demand check" } else { "" },
                if monotonic {
                    ""
                } else {
                    ", monotonic reads off"
                }
            ),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    requests: u64,
    reads: u64,
    follower_reads: u64,
    stale: u64,
    checks: u64,
    cache_gets: u64,
    cache_sets: u64,
}

/// The in-memory cache, counting calls: what a request costs the shared cache.
#[derive(Default)]
struct CountingCache {
    inner: MemoryCache,
    gets: AtomicU64,
    sets: AtomicU64,
}

#[async_trait]
impl Cache for CountingCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.sets.fetch_add(1, Ordering::Relaxed);
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.inner.delete(key).await
    }
}

impl Stats {
    fn follower_share(&self) -> f64 {
        self.follower_reads as f64 / self.reads as f64
    }
}

/// The leader's log over time; followers replay it `APPLY_DELAY` late.
struct World {
    start: Instant,
    log: Vec<(Duration, u64)>,
}

impl World {
    fn now(&self) -> Duration {
        Instant::now() - self.start
    }
    fn leader(&self) -> u64 {
        self.log.last().map_or(1, |(_, p)| *p)
    }
    fn replayed(&self) -> u64 {
        let Some(seen) = self.now().checked_sub(APPLY_DELAY) else {
            return 1;
        };
        let n = self.log.partition_point(|(at, _)| *at <= seen);
        if n == 0 { 1 } else { self.log[n - 1].1 }
    }
    fn commit(&mut self) -> u64 {
        let position = self.leader() + 100;
        let now = self.now();
        self.log.push((now, position));
        position
    }
}

struct WorldProbe {
    world: Arc<Mutex<World>>,
    calls: AtomicU64,
}

#[async_trait]
impl NodeProbe for WorldProbe {
    async fn leader_position(&self) -> Result<WalPosition, BoxError> {
        Ok(WalPosition(self.world.lock().unwrap().leader()))
    }
    async fn follower_position(&self, _: usize) -> Result<WalPosition, BoxError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(WalPosition(self.world.lock().unwrap().replayed()))
    }
}

/// The control: nobody is ever pinned.
struct NeverPinned;

#[async_trait]
impl RecentlyUpdated for NeverPinned {
    async fn is_recently_updated(&self, _: Subject<'_>) -> Result<bool, CacheError> {
        Ok(false)
    }
    async fn mark_updated(&self, _: Subject<'_>) -> Result<(), CacheError> {
        Ok(())
    }
    async fn mark_updated_at(
        &self,
        _: Subject<'_>,
        _: Option<WalPosition>,
    ) -> Result<Freshness, CacheError> {
        Ok(Freshness::Any)
    }
}

fn simulate(mode: Mode, workload: Workload) -> Stats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let interval = match mode {
            Mode::Causal { interval, .. } => interval,
            _ => Duration::from_millis(100),
        };
        let mut builder = Config::builder()
            .leader("leader", "leader")
            .lag_window(LAG_WINDOW)
            .probe_interval(interval);
        for i in 0..FOLLOWERS {
            builder = builder.follower(format!("f{i}"), format!("f{i}"));
        }
        let config = builder.build().expect("valid config");
        let world = Arc::new(Mutex::new(World {
            start: Instant::now(),
            log: Vec::new(),
        }));
        let monitor_probe = Arc::new(WorldProbe {
            world: world.clone(),
            calls: AtomicU64::new(0),
        });
        let check_probe = Arc::new(WorldProbe {
            world: world.clone(),
            calls: AtomicU64::new(0),
        });
        let cache = Arc::new(CountingCache::default());
        let router: Arc<dyn Router> = match mode {
            Mode::Naive => Arc::new(DistributedRouter::new(config.clone(), NeverPinned)),
            Mode::Time => Arc::new(DistributedRouter::new(
                config.clone(),
                SessionCachedRouter::new(cache.clone(), config.lag_window()),
            )),
            Mode::Causal {
                on_demand,
                monotonic,
                ..
            } => {
                let tracker = CausalTracker::new(cache.clone(), config.lag_window())
                    .monotonic_reads(monotonic);
                let mut router = CausalRouter::new(config.clone(), tracker);
                if on_demand {
                    router = router.probe_on_demand(check_probe.clone());
                }
                Arc::new(router)
            }
        };
        let _monitor = spawn_monitor(router.clone(), monitor_probe, config.probe_interval());

        let mut rng = StdRng::seed_from_u64(SEED);
        let mut last_write = vec![0u64; workload.scopes];
        let mut stats = Stats::default();
        let warm_up = LAG_WINDOW * 2;
        let end = warm_up + workload.duration;
        let rate = workload.scopes as f64 / workload.interval.as_secs_f64();
        let start = Instant::now();
        let (mut at, mut n) = (Duration::ZERO, 0u64);
        let mut warm_up_calls = (0, 0);
        loop {
            // Arrival times are exact; the clock (millisecond timers) catches up with them.
            at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(start + at).await;
            n += 1;
            if at >= warm_up {
                stats.requests += 1;
            }
            let scope_index = rng.random_range(0..workload.scopes);
            let scope = Scope::new(format!("session-{scope_index}"));
            if n.is_multiple_of(workload.k) {
                let position = world.lock().unwrap().commit();
                last_write[scope_index] = position;
                router
                    .record_write(Some(&scope), None, Some(WalPosition(position)))
                    .await
                    .expect("memory cache");
                continue;
            }
            let decision = router.route_read(Some(&scope), None).await;
            if at < warm_up {
                // Count the cache calls of the measured requests only.
                warm_up_calls = (
                    cache.gets.load(Ordering::Relaxed),
                    cache.sets.load(Ordering::Relaxed),
                );
                continue;
            }
            stats.reads += 1;
            if let Target::Follower(_) = decision.target {
                stats.follower_reads += 1;
                if world.lock().unwrap().replayed() < last_write[scope_index] {
                    stats.stale += 1;
                }
            }
        }
        stats.checks = check_probe.calls.load(Ordering::Relaxed);
        stats.cache_gets = cache.gets.load(Ordering::Relaxed) - warm_up_calls.0;
        stats.cache_sets = cache.sets.load(Ordering::Relaxed) - warm_up_calls.1;
        stats
    })
}

fn main() {
    let main = Workload {
        scopes: 2_000,
        interval: Duration::from_millis(500),
        k: 5,
        duration: Duration::from_secs(60),
    };
    println!(
        "Workload: {} scopes, each making a request every {} ms on average (Poisson), every \
         {}th request a write; {} followers {} ms behind; lag window {} s; {} s of traffic.\n",
        main.scopes,
        main.interval.as_millis(),
        main.k,
        FOLLOWERS,
        APPLY_DELAY.as_millis(),
        LAG_WINDOW.as_secs(),
        main.duration.as_secs()
    );
    let modes = [
        Mode::Naive,
        Mode::Time,
        Mode::CAUSAL,
        Mode::Causal {
            interval: Duration::from_millis(100),
            on_demand: true,
            monotonic: true,
        },
        Mode::Causal {
            interval: Duration::from_secs(1),
            on_demand: false,
            monotonic: true,
        },
        Mode::Causal {
            interval: Duration::from_secs(1),
            on_demand: true,
            monotonic: true,
        },
        Mode::Causal {
            interval: Duration::from_millis(100),
            on_demand: false,
            monotonic: false,
        },
    ];
    let time = simulate(Mode::Time, main);
    println!(
        "| router | reads | follower share | vs time mode | stale own-writes | on-demand checks per 1,000 reads | cache gets / sets per request |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mode in modes {
        let s = if mode == Mode::Time {
            time
        } else {
            simulate(mode, main)
        };
        println!(
            "| {} | {} | {:.1}% | {:.2}x | {} | {:.1} | {:.2} / {:.2} |",
            mode.label(),
            s.reads,
            100.0 * s.follower_share(),
            s.follower_share() / time.follower_share(),
            s.stale,
            1000.0 * s.checks as f64 / s.reads as f64,
            s.cache_gets as f64 / s.requests as f64,
            s.cache_sets as f64 / s.requests as f64,
        );
    }

    println!(
        "\nSweep: causal (monitor every 100 ms) / time mode follower share, 1,000 scopes, 30 s each; \
         stale own-writes were 0 in both modes in every cell (naive: stale in every cell).\n"
    );
    let ks = [2u64, 5, 10, 20];
    let header: Vec<String> = ks.iter().map(|k| format!("k = {k}")).collect();
    println!(
        "| time between a scope's requests | {} |",
        header.join(" | ")
    );
    println!("|---|{}", "---|".repeat(ks.len()));
    for interval_ms in [250u64, 500, 1000, 2000] {
        let mut cells = Vec::new();
        for k in ks {
            let w = Workload {
                scopes: 1_000,
                interval: Duration::from_millis(interval_ms),
                k,
                duration: Duration::from_secs(30),
            };
            let (t, c, n) = (
                simulate(Mode::Time, w),
                simulate(Mode::CAUSAL, w),
                simulate(Mode::Naive, w),
            );
            assert!(t.stale == 0 && c.stale == 0, "stale reads: {t:?} {c:?}");
            assert!(n.stale > 0, "the control shows no stale reads: {n:?}");
            cells.push(format!(
                "{:.2}x ({:.0}% / {:.0}%)",
                c.follower_share() / t.follower_share(),
                100.0 * c.follower_share(),
                100.0 * t.follower_share()
            ));
        }
        println!("| {interval_ms} ms | {} |", cells.join(" | "));
    }
}
