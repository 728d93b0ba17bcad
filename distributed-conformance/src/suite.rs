//! The test bodies.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distributed_core::{
    Config, ConfigBuilder, Decision, FollowerSet, Reason, Scope, Target, WalPosition, with_scope,
};
use distributed_testkit::{LogCapture, TopologyOptions, private_topology_or_skip, rig_or_skip};
use futures_util::StreamExt;
use tokio::time::{Instant, sleep};

use crate::{Adapter, Mode, Settings, SwitchableCache, TestRouter};

/// The lag window in causal mode: far longer than any wait of these tests, so that a read a
/// follower serves a scope after its write was sent there by position, while a time-mode pin
/// would still hold it on the leader.
pub(crate) const CAUSAL_LAG_WINDOW: Duration = Duration::from_secs(30);

/// The window a test's pins live: in time mode, the followers' apply delay plus a margin, so
/// that once it is over a follower has the write.
pub(crate) fn lag_window(apply_delay: Duration, mode: Mode) -> Duration {
    match mode {
        Mode::Time => apply_delay + Duration::from_secs(1),
        Mode::Causal => CAUSAL_LAG_WINDOW,
    }
}

/// How far behind a follower may fall before it is skipped. Probes starved of CPU on a loaded
/// test machine over-estimate lag; a follower is only skipped for lagging well past the real
/// apply delay.
fn max_lag(apply_delay: Duration) -> Duration {
    apply_delay + Duration::from_secs(2)
}

/// The tests' configuration, for a test to adjust before building.
pub(crate) fn builder(
    leader: &str,
    followers: &[String],
    apply_delay: Duration,
    mode: Mode,
) -> ConfigBuilder {
    let mut builder = Config::builder()
        .leader("leader", leader)
        .lag_window(lag_window(apply_delay, mode))
        .max_follower_lag(max_lag(apply_delay))
        .probe_interval(Duration::from_millis(200))
        .probe_backoff_max(Duration::from_secs(1))
        .readmit_ramp(Duration::from_secs(1));
    for (index, url) in followers.iter().enumerate() {
        builder = builder.follower(format!("follower-{index}"), url.as_str());
    }
    builder
}

fn config(leader: &str, followers: &[String], apply_delay: Duration, mode: Mode) -> Config {
    builder(leader, followers, apply_delay, mode)
        .build()
        .expect("a valid test configuration")
}

fn router(config: &Config, mode: Mode) -> (Arc<TestRouter>, Arc<SwitchableCache>) {
    let cache = Arc::new(SwitchableCache::default());
    let router = TestRouter::for_mode(config.clone(), cache.clone(), mode);
    (Arc::new(router), cache)
}

/// A pool over `config` routed by `router`; positions are reported whenever the router's mode
/// needs them.
pub(crate) async fn connect_to<A: Adapter>(
    config: Config,
    router: Arc<TestRouter>,
    settings: Settings,
) -> A {
    let settings = Settings {
        track_commit_position: settings.track_commit_position || router.mode().tracks_positions(),
        ..settings
    };
    match A::connect(config, router, settings).await {
        Ok(pool) => pool,
        Err(e) => panic!("the pool did not start: {e:?}"),
    }
}

async fn connect<A: Adapter>(
    leader: &str,
    followers: &[String],
    apply_delay: Duration,
    settings: Settings,
) -> (A, Arc<SwitchableCache>) {
    let (pool, cache, _router) =
        connect_with_router(leader, followers, apply_delay, Mode::Time, settings).await;
    (pool, cache)
}

pub(crate) async fn connect_with_router<A: Adapter>(
    leader: &str,
    followers: &[String],
    apply_delay: Duration,
    mode: Mode,
    settings: Settings,
) -> (A, Arc<SwitchableCache>, Arc<TestRouter>) {
    let config = config(leader, followers, apply_delay, mode);
    let (router, cache) = router(&config, mode);
    let pool = connect_to(config, router.clone(), settings).await;
    (pool, cache, router)
}

/// A table (and scope-key prefix) no other test, binary or run uses.
pub(crate) fn unique(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "conformance_{test}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn scope(table: &str, who: &str) -> Scope {
    Scope::new(format!("{table}:{who}"))
}

/// Waits until the followers have replayed what the leader did before the call.
pub(crate) async fn settle(apply_delay: Duration) {
    sleep(apply_delay + Duration::from_millis(800)).await;
}

/// Waits (up to `within`) until the monitor has seen `followers` (indices) replay `position`;
/// whether it did.
pub(crate) async fn monitor_sees_replayed(
    set: &FollowerSet,
    followers: &[usize],
    position: WalPosition,
    within: Duration,
) -> bool {
    eventually(within, || async {
        followers
            .iter()
            .all(|&i| set.replayed(i).is_some_and(|p| p >= position))
    })
    .await
}

/// A port on which nothing listens.
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

pub(crate) async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        sleep(Duration::from_millis(50)).await;
    }
    false
}

pub(crate) fn unwrap<T, E: std::fmt::Debug>(what: &str, result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

/// 1. Read-your-writes in `mode`: 200 scopes each write a row and read it back at once: 0
///    misses. In the same run, scopes that did not write read the same rows from followers and
///    miss them, which proves that the lag is real and the first check could fail.
///
/// A scope that just wrote reads the leader ([`Reason::RecentWrite`]); in causal mode it may
/// also read a follower already known to have its write ([`Reason::CaughtUpFollower`]), and
/// every write must have reported its position (or the mode fell back to time-mode pins).
pub async fn read_your_writes<A: Adapter>(mode: Mode) {
    let Some(rig) = rig_or_skip("read_your_writes") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, _cache, router) = connect_with_router::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        mode,
        Settings::default(),
    )
    .await;
    let table = unique("ryw");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;

    let writer_misses = AtomicUsize::new(0);
    let observer_follower_reads = AtomicUsize::new(0);
    let observer_misses = AtomicUsize::new(0);
    futures_util::stream::iter(0..200_i64)
        .for_each_concurrent(16, |id| {
            let (pool, table) = (&pool, table.as_str());
            let (writer_misses, observer_follower_reads, observer_misses) =
                (&writer_misses, &observer_follower_reads, &observer_misses);
            async move {
                with_scope(scope(table, &format!("writer-{id}")), async {
                    // Half through the plain write path, half through a transaction.
                    let written = if id % 2 == 0 {
                        pool.write(table, id).await
                    } else {
                        pool.write_in_transaction(table, id).await
                    };
                    unwrap("write", written);
                    let seen = unwrap("read back", pool.read(table, id).await);
                    let caught_up = mode == Mode::Causal
                        && matches!(seen.decision.target, Target::Follower(_))
                        && seen.decision.reason == Reason::CaughtUpFollower;
                    assert!(
                        seen.decision == Decision::leader(Reason::RecentWrite) || caught_up,
                        "a scope that just wrote must read the leader ({mode:?} mode), got {:?}",
                        seen.decision
                    );
                    if seen.value != Some(id) {
                        writer_misses.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
                with_scope(scope(table, &format!("observer-{id}")), async {
                    let seen = unwrap("observer read", pool.read(table, id).await);
                    if let Target::Follower(_) = seen.decision.target {
                        observer_follower_reads.fetch_add(1, Ordering::SeqCst);
                        if seen.value.is_none() {
                            observer_misses.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let fresh = unwrap("force-leader read", pool.read_leader(table, id).await);
                    assert_eq!(fresh.decision, Decision::leader(Reason::Forced));
                    assert_eq!(
                        fresh.value,
                        Some(id),
                        "a force-leader read sees every write"
                    );
                })
                .await;
            }
        })
        .await;

    let (writer_misses, follower_reads, misses) = (
        writer_misses.into_inner(),
        observer_follower_reads.into_inner(),
        observer_misses.into_inner(),
    );
    assert_eq!(
        writer_misses, 0,
        "scopes missed their own writes ({writer_misses} of 200, {mode:?} mode)"
    );
    if mode.tracks_positions() {
        let positions = router.recorded_positions();
        assert!(
            positions.len() == 200 && positions.iter().all(Option::is_some),
            "in causal mode every write reports its position: {} of {} did",
            positions.iter().flatten().count(),
            positions.len()
        );
    }
    assert!(
        follower_reads >= 100,
        "scopes that did not write should read followers; only {follower_reads} of 200 did"
    );
    assert!(
        misses > 0,
        "no scope that did not write missed a fresh row ({follower_reads} follower reads): \
         the followers do not lag, so this test proves nothing"
    );
    eprintln!(
        "read_your_writes ({mode:?} mode): 0 of 200 own-write misses; {misses} of \
         {follower_reads} follower reads by other scopes missed the fresh row"
    );
}

/// 2. Once the lag window is over, the writer's reads go back to the followers (and find the
///    write there).
pub async fn reads_return_to_followers_after_the_window<A: Adapter>() {
    let Some(rig) = rig_or_skip("reads_return_to_followers_after_the_window") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, _cache) = connect::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Settings::default(),
    )
    .await;
    let table = unique("window");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;

    with_scope(scope(&table, "writer"), async {
        unwrap("write", pool.write(&table, 1).await);
        let seen = unwrap("read back", pool.read(&table, 1).await);
        assert_eq!(seen.decision, Decision::leader(Reason::RecentWrite));
        assert_eq!(seen.value, Some(1));
    })
    .await;
    sleep(lag_window(apply_delay, Mode::Time) + Duration::from_millis(300)).await;
    // A later request of the same scope.
    with_scope(scope(&table, "writer"), async {
        let seen = unwrap("read after the window", pool.read(&table, 1).await);
        assert!(
            matches!(seen.decision.target, Target::Follower(_)),
            "after the window the writer reads followers again, got {:?}",
            seen.decision
        );
        assert_eq!(seen.decision.reason, Reason::HealthyFollower);
        assert_eq!(seen.value, Some(1), "the window covers the followers' lag");
    })
    .await;
}

/// 5. A write sent through a read handle (a follower's, or the force-leader one) fails with the
///    adapter's typed error and writes nothing.
pub async fn write_through_a_read_handle_fails<A: Adapter>() {
    let Some(rig) = rig_or_skip("write_through_a_read_handle_fails") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, _cache) = connect::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Settings::default(),
    )
    .await;
    let table = unique("readonly");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;

    with_scope(scope(&table, "reader"), async {
        for leader in [false, true] {
            match pool.write_through_read_handle(&table, 7, leader).await {
                Ok(decision) => panic!("a write through a read handle succeeded on {decision:?}"),
                Err(e) => assert!(
                    A::is_read_only(&e),
                    "expected the typed read-only error (leader handle: {leader}), got {e:?}"
                ),
            }
        }
        let seen = unwrap("force-leader read", pool.read_leader(&table, 7).await);
        assert_eq!(seen.value, None, "the refused write left nothing behind");
    })
    .await;
}

/// 6. An unreachable follower at start-up: the pool starts, with that follower marked down, and
///    reads go elsewhere. An unreachable leader: a typed error, soon, without the password.
pub async fn starts_with_unreachable_servers<A: Adapter>() {
    let Some(rig) = rig_or_skip("starts_with_unreachable_servers") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let secret = "conformance-secret";
    let dead = format!(
        "postgres://postgres:{secret}@127.0.0.1:{}/postgres",
        dead_port()
    );
    let mut followers = vec![dead.clone()];
    followers.extend(rig.follower_urls().iter().cloned());

    let (logs, log_guard) = LogCapture::start();
    let (pool, _cache) = connect::<A>(
        rig.leader_url(),
        &followers,
        apply_delay,
        Settings::default(),
    )
    .await;
    assert!(
        !pool.followers().is_up(0),
        "an unreachable follower starts marked down"
    );
    let logged = logs.text();
    assert!(
        logged.contains("follower-0") && logged.contains("postgres://postgres:***@127.0.0.1:"),
        "the unreachable follower is logged, its URL without password:\n{logged}"
    );
    let table = unique("startup");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;
    for n in 0..20 {
        with_scope(scope(&table, &format!("reader-{n}")), async {
            let seen = unwrap("read", pool.read(&table, 1).await);
            assert_ne!(seen.decision.target, Target::Follower(0));
        })
        .await;
    }
    drop(pool);

    let settings = Settings {
        leader_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let config = config(&dead, rig.follower_urls(), apply_delay, Mode::Time);
    let (router, _cache) = router(&config, Mode::Time);
    let started = Instant::now();
    let outcome = A::connect(config, router, settings.clone()).await;
    let took = started.elapsed();
    let Err(e) = outcome else {
        panic!("a pool whose leader is unreachable started");
    };
    assert!(
        A::is_leader_unavailable(&e),
        "expected the typed leader-unavailable error, got {e:?}"
    );
    assert!(
        took < settings.leader_timeout + Duration::from_secs(5),
        "start-up with an unreachable leader took {took:?}"
    );
    let shown = format!("{e} / {e:?}");
    assert!(
        !shown.contains(secret),
        "the error shows the password: {shown}"
    );
    drop(log_guard);
    let logged = logs.text();
    assert!(
        !logged.contains(secret),
        "a log line shows the password:\n{logged}"
    );
}

/// With commit-position tracking on, every write (plain or transaction) reports the leader's
/// WAL position to the router, later writes at later positions; with it off (the default),
/// none does, and no extra query runs. With one leader connection: reading the position must
/// not wait for a second connection while the write still holds the first.
pub async fn reports_commit_positions<A: Adapter>() {
    let Some(rig) = rig_or_skip("reports_commit_positions") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    for track in [false, true] {
        let settings = Settings {
            track_commit_position: track,
            max_connections: 1,
            ..Settings::default()
        };
        let (pool, _cache, router) = connect_with_router::<A>(
            rig.leader_url(),
            rig.follower_urls(),
            apply_delay,
            Mode::Time,
            settings,
        )
        .await;
        let table = unique("positions");
        unwrap("create table", pool.create_table(&table).await);
        with_scope(scope(&table, "writer"), async {
            unwrap("write", pool.write(&table, 1).await);
            unwrap("write", pool.write_in_transaction(&table, 2).await);
            unwrap("write", pool.write(&table, 3).await);
        })
        .await;
        let positions = router.recorded_positions();
        assert_eq!(positions.len(), 3, "one mark per write: {positions:?}");
        if track {
            let known: Vec<_> = positions.iter().flatten().copied().collect();
            assert_eq!(
                known.len(),
                3,
                "every write reports its position: {positions:?}"
            );
            assert!(
                known.windows(2).all(|pair| pair[0] < pair[1]),
                "later writes, later positions: {positions:?}"
            );
        } else {
            assert!(
                positions.iter().all(Option::is_none),
                "tracking is off by default: {positions:?}"
            );
        }
    }
}

/// The cache that holds pins is down when a write succeeds: the write still succeeds, and the
/// rest of the request reads the leader; so do later requests of the scope while the cache is
/// down (the router cannot know they are not pinned).
pub async fn cache_down_at_mark_time<A: Adapter>() {
    let Some(rig) = rig_or_skip("cache_down_at_mark_time") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, cache) = connect::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Settings::default(),
    )
    .await;
    let table = unique("cachedown");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;

    cache.set_down(true);
    with_scope(scope(&table, "writer"), async {
        unwrap(
            "a write whose pin cannot be stored",
            pool.write(&table, 1).await,
        );
        assert!(cache.failed_sets() > 0, "the pin was attempted");
        let seen = unwrap("read back", pool.read(&table, 1).await);
        assert_eq!(seen.decision.target, Target::Leader);
        assert_eq!(seen.value, Some(1));
    })
    .await;
    with_scope(scope(&table, "writer"), async {
        let seen = unwrap("next request", pool.read(&table, 1).await);
        assert_eq!(seen.decision, Decision::leader(Reason::CacheUnavailable));
        assert_eq!(seen.value, Some(1));
    })
    .await;
    cache.set_down(false);
}

#[derive(Default)]
struct Tally {
    found: AtomicUsize,
    missing: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

/// What needs servers paused or crashed, on one private topology (each costs seconds to
/// start), in turn:
///
/// 1. Monotonic reads (causal mode), with one follower's replay paused while the other keeps
///    up: a scope that read a fresh row (from the leader, or with a token from the follower
///    that has it) never reads the paused follower next, and when it reads the leader for it,
///    says why ([`Reason::MonotonicFloor`]); the same script with monotonic reads off does
///    read the paused follower and misses the row, so the check could fail. And a read is
///    recorded at where its server was after it, not where the monitor last saw it.
/// 2. Followers whose replay is paused are skipped as lagging ([`Reason::FollowersLagging`])
///    once the monitor measures them past the maximum lag, and used again once they catch up.
/// 3. A follower crashed (`pg_ctl stop -m immediate`) in the middle of a read loop costs no
///    read, and is used again once restarted.
/// 4. With the leader crashed, writes fail with the typed error within the timeout while reads
///    without a pin go on from the followers, and once it is back writes work again.
pub async fn monotonic_reads_lagging_and_crashes<A: Adapter>() {
    let apply_delay = Duration::from_millis(500);
    let options = TopologyOptions {
        followers: 2,
        apply_delay,
        ..TopologyOptions::default()
    };
    let topology = unwrap(
        "private topology",
        private_topology_or_skip("monotonic_reads_lagging_and_crashes", options).await,
    );
    let Some(topology) = topology else {
        return;
    };

    // 1. Monotonic reads.
    crate::causal::monotonic_reads_with_a_paused_follower::<A>(&topology, apply_delay).await;
    crate::causal::monotonic_reads_record_an_upper_bound::<A>(&topology, apply_delay).await;

    // 2. Lagging followers; then 3. and 4., crashes, in time mode.
    let settings = Settings::default();
    let (pool, _cache) = connect::<A>(
        topology.leader_url(),
        topology.follower_urls(),
        apply_delay,
        settings.clone(),
    )
    .await;
    let pool = Arc::new(pool);
    let table = unique("crash");
    unwrap("create table", pool.create_table(&table).await);
    for id in 0..20 {
        unwrap("seed", pool.write(&table, id).await);
    }
    settle(apply_delay).await;

    // Lag: both followers stop replaying while the leader moves on.
    for follower in 0..2 {
        unwrap(
            "pause replay",
            topology.pause_follower_replay(follower).await,
        );
    }
    let max_lag = max_lag(apply_delay);
    let mut next_id = 100;
    let lagging = eventually(max_lag * 4, || {
        next_id += 1;
        let (pool, table, id) = (&pool, &table, next_id);
        async move {
            unwrap("write while replay is paused", pool.write(table, id).await);
            let seen = with_scope(
                scope(table, &format!("lag-reader-{id}")),
                pool.read(table, 0),
            );
            unwrap("read while replay is paused", seen.await).decision
                == Decision::leader(Reason::FollowersLagging)
        }
    })
    .await;
    assert!(
        lagging,
        "followers that stopped replaying were not skipped as lagging"
    );
    for follower in 0..2 {
        unwrap(
            "resume replay",
            topology.resume_follower_replay(follower).await,
        );
    }
    let caught_up = eventually(Duration::from_secs(15), || {
        let (pool, table) = (&pool, &table);
        async move {
            let seen = with_scope(scope(table, "caught-up-reader"), pool.read(table, 0)).await;
            unwrap("read after resuming", seen).decision.reason == Reason::HealthyFollower
        }
    })
    .await;
    assert!(caught_up, "followers that caught up were not used again");

    // 3. A follower crashes in the middle of a read loop.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let readers: Vec<_> = (0..4_i64)
        .map(|reader| {
            let (pool, table, stop, tally) =
                (pool.clone(), table.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut id = reader;
                while !stop.load(Ordering::SeqCst) {
                    match pool.read_with_failover(&table, id % 20).await {
                        Ok(seen) if seen.value.is_some() => {
                            tally.found.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {
                            tally.missing.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => tally.failed.lock().expect("tally").push(format!("{e:?}")),
                    }
                    id += 1;
                }
            })
        })
        .collect();
    sleep(Duration::from_millis(500)).await;
    unwrap("crash follower 0", topology.stop_follower(0).await);
    sleep(Duration::from_millis(1500)).await;
    assert!(
        !pool.followers().is_up(0),
        "the crashed follower is marked down"
    );
    let found_while_down = tally.found.load(Ordering::SeqCst);
    unwrap("restart follower 0", topology.start_follower(0).await);
    let used_again = eventually(Duration::from_secs(30), || {
        let (pool, table) = (&pool, &table);
        async move {
            with_scope(scope(table, "probe-reader"), async {
                pool.followers().is_up(0)
                    && pool
                        .read(table, 0)
                        .await
                        .is_ok_and(|seen| seen.decision.target == Target::Follower(0))
            })
            .await
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        unwrap("reader task", reader.await);
    }
    let failed = tally.failed.lock().expect("tally").clone();
    assert!(
        failed.is_empty(),
        "{} reads failed while a follower crashed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        tally.missing.load(Ordering::SeqCst),
        0,
        "reads missed old rows"
    );
    assert!(found_while_down > 0, "the read loop made no progress");
    assert!(used_again, "the restarted follower was not used again");

    // 4. The leader crashes.
    unwrap("crash the leader", topology.stop_leader().await);
    let started = Instant::now();
    let written = with_scope(scope(&table, "writer-while-down"), pool.write(&table, 1000)).await;
    let took = started.elapsed();
    match written {
        Ok(()) => panic!("a write succeeded with the leader down"),
        Err(e) => assert!(
            A::is_leader_unavailable(&e),
            "expected the typed leader-unavailable error, got {e:?}"
        ),
    }
    assert!(
        took < settings.leader_timeout + Duration::from_secs(5),
        "a write with the leader down took {took:?}: it must fail within the acquire timeout"
    );
    for id in 0..20 {
        with_scope(scope(&table, &format!("reader-while-down-{id}")), async {
            let seen = unwrap(
                "read with the leader down",
                pool.read_with_failover(&table, id).await,
            );
            assert!(matches!(seen.decision.target, Target::Follower(_)));
            assert_eq!(seen.value, Some(id));
        })
        .await;
    }
    unwrap("restart the leader", topology.start_leader().await);
    with_scope(scope(&table, "writer-after"), async {
        unwrap(
            "a write once the leader is back",
            pool.write(&table, 1001).await,
        );
        let seen = unwrap("read back", pool.read(&table, 1001).await);
        assert_eq!(seen.value, Some(1001));
    })
    .await;

    drop(pool);
    unwrap("shutdown", topology.shutdown().await);
}
