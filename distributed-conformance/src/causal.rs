//! The test bodies of causal mode: reads routed by WAL position instead of a time window.
//!
//! The lag window is [`CAUSAL_LAG_WINDOW`] (30 s) in this mode, far longer than any of these
//! tests waits: a read a follower serves a scope after its write was sent there by position.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use distributed_core::{
    ConfigBuilder, ConsistencyToken, Decision, Freshness, Reason, Scope, Target, TokenSigner,
    current_scope, with_scope,
};
use distributed_testkit::{Topology, rig_or_skip};
use tokio::time::Instant;

use crate::suite::{
    CAUSAL_LAG_WINDOW, builder, connect_to, connect_with_router, eventually, monitor_sees_replayed,
    scope, settle, unique, unwrap,
};
use crate::{Adapter, Mode, Observed, Settings, SwitchableCache, TestRouter};

const SIGNING_KEY: &[u8] = b"conformance signing key, 32+ bytes long";

/// Writes one more row (in a scope of its own) so that the leader's log moves past everything
/// written before. A commit's reported position can sit just past a WAL page header that the
/// followers' replay position reaches only with the next record; on a quiet server, waiting for
/// it would wait for ever.
async fn fence<A: Adapter>(pool: &A, table: &str) {
    static FENCES: AtomicI64 = AtomicI64::new(i64::MAX);
    let id = FENCES.fetch_sub(1, Ordering::Relaxed);
    let fence = with_scope(scope(table, "fence"), pool.write(table, id));
    unwrap("fence write", fence.await);
}

/// Causal mode's point: as soon as the followers have replayed a scope's write, its reads go
/// back to them ([`Reason::CaughtUpFollower`]), finding the write — within seconds, while a
/// time-mode pin (the lag window, 30 s here) would still hold them on the leader.
pub async fn reads_return_to_caught_up_followers<A: Adapter>() {
    let Some(rig) = rig_or_skip("reads_return_to_caught_up_followers") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, _cache, router) = connect_with_router::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Mode::Causal,
        Settings::default(),
    )
    .await;
    let table = unique("caught_up");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;

    const WRITERS: i64 = 20;
    let written = Instant::now();
    for id in 0..WRITERS {
        with_scope(scope(&table, &format!("writer-{id}")), async {
            unwrap("write", pool.write(&table, id).await);
            let seen = unwrap("read back", pool.read(&table, id).await);
            assert_eq!(seen.value, Some(id), "read back on {:?}", seen.decision);
        })
        .await;
    }
    let newest = router
        .newest_position()
        .expect("causal mode reports commit positions");
    fence(&pool, &table).await;
    let followers: Vec<usize> = (0..pool.followers().len()).collect();
    assert!(
        monitor_sees_replayed(
            pool.followers(),
            &followers,
            newest,
            Duration::from_secs(15)
        )
        .await,
        "the monitor never saw the followers replay the writes"
    );

    // Later requests of the writers.
    for id in 0..WRITERS {
        let seen = with_scope(
            scope(&table, &format!("writer-{id}")),
            pool.read(&table, id),
        );
        let seen = unwrap("later read", seen.await);
        assert!(
            matches!(seen.decision.target, Target::Follower(_))
                && seen.decision.reason == Reason::CaughtUpFollower,
            "once the followers have its write, a writer reads them again; got {:?}",
            seen.decision
        );
        assert_eq!(seen.value, Some(id), "a caught-up follower has the write");
    }
    let took = written.elapsed();
    assert!(
        took < CAUSAL_LAG_WINDOW,
        "the writers read followers again only after {took:?}: a time window of \
         {CAUSAL_LAG_WINDOW:?} would have done as well"
    );
    eprintln!(
        "reads_return_to_caught_up_followers: {WRITERS} of {WRITERS} writers read caught-up \
         followers {took:?} after writing, a lag window of {CAUSAL_LAG_WINDOW:?} would have held \
         them on the leader"
    );
}

/// Causal mode's on-demand check, through the adapter's own probe
/// ([`Adapter::probe`], attached with `CausalRouter::attach_probe` after the pool was built).
/// The monitor is slow (one probe a minute), so it cannot know that the followers replayed a
/// write a moment ago: without the check the writer's next request reads the leader
/// ([`Reason::RecentWrite`]); with it, the router asks a follower and reads it
/// ([`Reason::CaughtUpFollower`]).
pub async fn followers_are_checked_on_demand<A: Adapter>() {
    let Some(rig) = rig_or_skip("followers_are_checked_on_demand") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let config = builder(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Mode::Causal,
    )
    .probe_interval(Duration::from_secs(60))
    .build()
    .expect("a valid test configuration");
    let router = Arc::new(TestRouter::for_mode(
        config.clone(),
        Arc::new(SwitchableCache::default()),
        Mode::Causal,
    ));
    let pool: A = connect_to(config, router.clone(), Settings::default()).await;
    let table = unique("on_demand");
    unwrap("create table", pool.create_table(&table).await);
    with_scope(scope(&table, "writer"), async {
        unwrap("write", pool.write(&table, 1).await);
    })
    .await;
    let written = router
        .newest_position()
        .expect("causal mode reports commit positions");
    fence(&pool, &table).await;

    // Every follower has the write, as the probe (not the monitor) sees.
    let probe = pool.probe();
    let replayed = eventually(Duration::from_secs(15), || {
        let probe = probe.clone();
        let followers = pool.followers().len();
        async move {
            for index in 0..followers {
                match probe.follower_position(index).await {
                    Ok(position) if position >= written => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    assert!(replayed, "the followers never replayed the write");
    let monitor_knows = (0..pool.followers().len())
        .any(|i| pool.followers().replayed(i).is_some_and(|p| p >= written));
    assert!(
        !monitor_knows,
        "the slow monitor already knows: the test proves nothing"
    );

    let read = || with_scope(scope(&table, "writer"), pool.read(&table, 1));
    let seen = unwrap("read without the check", read().await);
    assert_eq!(
        seen.decision,
        Decision::leader(Reason::RecentWrite),
        "without an on-demand check the router cannot know the followers caught up"
    );
    assert_eq!(seen.value, Some(1));

    assert!(
        router.attach_probe(pool.probe()),
        "the first probe attaches"
    );
    let seen = unwrap("read with the check", read().await);
    assert!(
        matches!(seen.decision.target, Target::Follower(_))
            && seen.decision.reason == Reason::CaughtUpFollower,
        "the router asks a follower, finds it caught up and reads it; got {:?}",
        seen.decision
    );
    assert_eq!(seen.value, Some(1), "the follower asked has the write");
}

/// A consistency token in a job's payload: a request writes a row and enqueues a job with its
/// signed token; a worker task with no scope reads the row with it, every time. The same
/// worker reading without the token misses some rows: the followers lag, the check could fail.
pub async fn a_token_in_a_job_payload_reads_the_write<A: Adapter>() {
    let Some(rig) = rig_or_skip("a_token_in_a_job_payload_reads_the_write") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let (pool, _cache, router) = connect_with_router::<A>(
        rig.leader_url(),
        rig.follower_urls(),
        apply_delay,
        Mode::Causal,
        Settings::default(),
    )
    .await;
    let pool = Arc::new(pool);
    let table = unique("job");
    unwrap("create table", pool.create_table(&table).await);
    settle(apply_delay).await;
    let signer = unwrap("a signing key", TokenSigner::new(SIGNING_KEY));

    const JOBS: i64 = 50;
    let (jobs, mut queue) = tokio::sync::mpsc::channel::<String>(64);
    let worker = {
        let (pool, table, signer) = (pool.clone(), table.clone(), signer.clone());
        tokio::spawn(async move {
            let (mut misses, mut misses_without_token, mut done) = (0, 0, 0);
            while let Some(payload) = queue.recv().await {
                // The payload: `<id> <token>`, as a job queue would carry it.
                let (id, token) = payload.split_once(' ').expect("a payload");
                let id: i64 = id.parse().expect("an id");
                assert!(current_scope().is_none(), "a job runs outside any scope");
                let Observed { value, .. } = unwrap("read", pool.read(&table, id).await);
                if value.is_none() {
                    misses_without_token += 1;
                }
                let token = unwrap("a genuine token", signer.verify(token));
                let seen = with_scope(Scope::from_token(&token), pool.read(&table, id)).await;
                let seen = unwrap("read with the token", seen);
                if seen.value.is_none() {
                    misses += 1;
                    eprintln!("job {id} missed the row on {:?}", seen.decision);
                }
                done += 1;
            }
            (misses, misses_without_token, done)
        })
    };
    for id in 0..JOBS {
        let request = scope(&table, &format!("user-{id}"));
        unwrap(
            "write",
            with_scope(request.clone(), pool.write(&table, id)).await,
        );
        let token = unwrap("a token", router.token(&request).await);
        assert!(
            matches!(token.freshness(), Freshness::AtLeast(_)),
            "a write of known position gives a position token, got {token}"
        );
        jobs.send(format!("{id} {}", signer.sign(&token)))
            .await
            .expect("the worker is running");
    }
    drop(jobs);
    let (misses, misses_without_token, done) = unwrap("the worker", worker.await);
    assert_eq!(done, JOBS);
    assert_eq!(
        misses, 0,
        "jobs with the token missed {misses} of {JOBS} writes"
    );
    assert!(
        misses_without_token > 0,
        "jobs without the token missed nothing: the followers do not lag, so this test proves \
         nothing"
    );
    eprintln!(
        "a_token_in_a_job_payload_reads_the_write: 0 of {JOBS} misses with the token, \
         {misses_without_token} of {JOBS} without"
    );
}

/// How the second request of each reader went, for one router.
#[derive(Debug, Default)]
struct NextReads {
    /// Reads of the follower that does not have the rows.
    behind: usize,
    /// Reads of the follower that has them.
    caught_up: usize,
    /// Rows the first request saw and the second did not.
    vanished: usize,
    /// Leader reads, by reason.
    leader: Vec<Reason>,
}

/// Monotonic reads on `topology` (two followers, both replaying). Follower 1's replay is
/// paused, then rows are written that follower 0 has soon after and follower 1 never gets;
/// then follower 0 is paused too, and the leader moves on past both. Each reader's first
/// request sees its row:
///
/// - half read it from the leader (a forced read), seeing data newer than both followers:
///   their next request must read the leader, held there by what they read
///   ([`Reason::MonotonicFloor`]: they never wrote);
/// - half carry the author's token and read it from follower 0, the follower that has the
///   row: their next request may read follower 0 again, and does.
///
/// Neither may read follower 1, which does not have the row. A router without monotonic reads,
/// running the same script, reads follower 1 about half the time and misses the rows, so the
/// check could fail. Both followers stay in rotation for ordinary reads (a long maximum lag),
/// as followers a little behind would be; and with both paused, nothing moves while the
/// readers read, so the outcome does not depend on timing. Resumes both before returning.
pub(crate) async fn monotonic_reads_with_a_paused_follower<A: Adapter>(
    topology: &Topology,
    apply_delay: Duration,
) {
    const READERS: i64 = 20;
    const HAS_ROWS: usize = 0;
    const BEHIND: usize = 1;
    let (monotonic, monotonic_router) = causal_pool::<A>(topology, apply_delay, true, |b| b).await;
    let (plain, _) = causal_pool::<A>(topology, apply_delay, false, |b| b).await;
    let table = unique("monotonic");
    unwrap("create table", monotonic.create_table(&table).await);
    settle(apply_delay).await;

    unwrap("pause replay", topology.pause_follower_replay(BEHIND).await);
    let mut tokens: Vec<ConsistencyToken> = Vec::new();
    for id in 0..READERS {
        let author = scope(&table, &format!("author-{id}"));
        unwrap(
            "write",
            with_scope(author.clone(), monotonic.write(&table, id)).await,
        );
        tokens.push(author.token());
    }
    let newest = monotonic_router
        .newest_position()
        .expect("causal mode reports commit positions");
    fence(&monotonic, &table).await;
    for pool in [&monotonic, &plain] {
        let has_rows = monitor_sees_replayed(
            pool.followers(),
            &[HAS_ROWS],
            newest,
            Duration::from_secs(15),
        )
        .await;
        assert!(
            has_rows,
            "the monitor never saw follower {HAS_ROWS} replay the rows"
        );
    }
    // Freeze follower 0 too, and move the leader past both.
    unwrap(
        "pause replay",
        topology.pause_follower_replay(HAS_ROWS).await,
    );
    fence(&monotonic, &table).await;
    for pool in [&monotonic, &plain] {
        let set = pool.followers();
        let ahead = eventually(Duration::from_secs(15), || async {
            let leader = set.leader_position();
            leader.is_some() && leader > set.replayed(HAS_ROWS)
        })
        .await;
        assert!(
            ahead,
            "the monitor never saw the leader move past the followers"
        );
        assert!(
            set.replayed(BEHIND).is_some_and(|p| p < newest),
            "the monitor knows follower {BEHIND} is behind the rows"
        );
    }

    let mut outcomes = Vec::new();
    for (pool, label) in [(&monotonic, "monotonic"), (&plain, "plain")] {
        let mut next = NextReads::default();
        for id in 0..READERS {
            let reader = format!("{table}:{label}-reader-{id}");
            // The first request sees the row.
            let first = if id % 2 == 0 {
                with_scope(Scope::new(reader.clone()), pool.read_leader(&table, id)).await
            } else {
                let request = Scope::new(reader.clone()).with_token(&tokens[id as usize]);
                with_scope(request, pool.read(&table, id)).await
            };
            let first = unwrap("first read", first);
            assert_eq!(first.value, Some(id), "the first read sees the row");
            assert_ne!(first.decision.target, Target::Follower(BEHIND));
            // Its next request.
            let seen = unwrap(
                "next read",
                with_scope(Scope::new(reader), pool.read(&table, id)).await,
            );
            match seen.decision.target {
                Target::Follower(BEHIND) => next.behind += 1,
                Target::Follower(_) => next.caught_up += 1,
                Target::Leader => next.leader.push(seen.decision.reason),
            }
            if seen.value.is_none() {
                next.vanished += 1;
            }
        }
        outcomes.push(next);
    }
    for follower in [HAS_ROWS, BEHIND] {
        unwrap(
            "resume replay",
            topology.resume_follower_replay(follower).await,
        );
    }
    let (with, without) = (&outcomes[0], &outcomes[1]);
    assert_eq!(
        (with.behind, with.vanished),
        (0, 0),
        "with monotonic reads, no scope reads a follower behind what it saw: {with:?}"
    );
    let half = usize::try_from(READERS / 2).expect("a count");
    assert_eq!(
        (with.leader.len(), with.caught_up),
        (half, half),
        "readers that saw the leader read it again, the others the follower that has their \
         row: {with:?}"
    );
    assert!(
        with.leader.iter().all(|r| *r == Reason::MonotonicFloor),
        "a reader that never wrote is held on the leader by what it read: {with:?}"
    );
    assert!(
        without.behind > 0 && without.vanished > 0,
        "without monotonic reads no seen row vanished ({without:?}): the follower without the \
         rows is not read, so this test proves nothing"
    );
    eprintln!(
        "monotonic_reads_with_a_paused_follower: with monotonic reads 0 of {READERS} readers \
         read the follower without their row ({} read the leader for the floor, {} the follower \
         with it); without, {} did and {} rows vanished",
        with.leader.len(),
        with.caught_up,
        without.behind,
        without.vanished
    );
}

/// A causal-mode pool over `topology` (followers may lag up to 600 s), its configuration
/// adjusted by `adjust`, with monotonic reads on or off.
async fn causal_pool<A: Adapter>(
    topology: &Topology,
    apply_delay: Duration,
    monotonic: bool,
    adjust: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (A, Arc<TestRouter>) {
    let builder = builder(
        topology.leader_url(),
        topology.follower_urls(),
        apply_delay,
        Mode::Causal,
    )
    .max_follower_lag(Duration::from_secs(600));
    let config = adjust(builder).build().expect("a valid test configuration");
    let cache = Arc::new(SwitchableCache::default());
    let router = Arc::new(TestRouter::causal(config.clone(), cache, monotonic));
    let pool = connect_to(config, router.clone(), Settings::default()).await;
    (pool, router)
}

/// What a scope's second request saw of the row its first request read.
#[derive(Debug, Default)]
struct SecondReads {
    /// Second reads the lagging follower served.
    lagging_follower: usize,
    /// Second reads that did not find the row the first read found.
    vanished: usize,
}

/// Monotonic reads record what a read *could have seen*, not what the monitor last knew of
/// its server. The monitor's knowledge is frozen here (a probe interval of an hour) at
/// follower 1's replay position, taken while its replay is paused; follower 0 goes on
/// replaying past it and serves each scope's first read (a row written after follower 1
/// froze), or the leader does (a forced read). Then only follower 1 is up. A router that
/// recorded the first read at its server's *known* position (follower 1's, as far as the
/// monitor knows) sends the second request to follower 1, where the row is missing; one that
/// recorded its server's position taken after the read on the same connection does not. The
/// same script with monotonic reads off must lose rows, or the test proves nothing.
pub(crate) async fn monotonic_reads_record_an_upper_bound<A: Adapter>(
    topology: &Topology,
    apply_delay: Duration,
) {
    const AHEAD: usize = 0;
    const FROZEN: usize = 1;
    const READERS: i64 = 10;
    let frozen_monitor = |builder: ConfigBuilder| {
        builder
            .probe_interval(Duration::from_secs(3600))
            .readmit_ramp(Duration::from_millis(1))
    };
    let (monotonic, _) = causal_pool::<A>(topology, apply_delay, true, frozen_monitor).await;
    let (plain, _) = causal_pool::<A>(topology, apply_delay, false, frozen_monitor).await;
    let table = unique("upper_bound");
    unwrap("create table", monotonic.create_table(&table).await);
    settle(apply_delay).await;

    unwrap("pause replay", topology.pause_follower_replay(FROZEN).await);
    let probe = monotonic.probe();
    let frozen_at = unwrap("frozen position", probe.follower_position(FROZEN).await);
    let leader_at = unwrap("leader position", probe.leader_position().await);
    for id in 0..READERS * 2 {
        let writer = scope(&table, &format!("writer-{id}"));
        unwrap(
            "write",
            with_scope(writer, monotonic.write(&table, id)).await,
        );
    }
    fence(&monotonic, &table).await;
    // Follower 0 has the rows now; follower 1 does not.
    settle(apply_delay).await;

    let mut outcomes = Vec::new();
    for (pool, label) in [(&monotonic, "monotonic"), (&plain, "plain")] {
        let set = pool.followers();
        // What the monitor knew before the rows: both followers (and the leader) at most where
        // follower 1 froze.
        set.observe_replayed(AHEAD, frozen_at);
        set.observe_replayed(FROZEN, frozen_at);
        set.record_leader(leader_at.max(frozen_at));
        let mut second = SecondReads::default();
        for id in 0..READERS * 2 {
            let reader = format!("{table}:{label}-reader-{id}");
            set.mark_up(AHEAD);
            set.mark_down(FROZEN);
            // Half the first reads are routed (to follower 0), half forced to the leader.
            let first = if id % 2 == 0 {
                with_scope(Scope::new(reader.clone()), pool.read(&table, id)).await
            } else {
                with_scope(Scope::new(reader.clone()), pool.read_leader(&table, id)).await
            };
            let first = unwrap("first read", first);
            assert_eq!(first.value, Some(id), "the first read finds the row");
            assert_ne!(first.decision.target, Target::Follower(FROZEN));
            set.mark_down(AHEAD);
            set.mark_up(FROZEN);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let next = unwrap(
                "second read",
                with_scope(Scope::new(reader), pool.read(&table, id)).await,
            );
            if next.decision.target == Target::Follower(FROZEN) {
                second.lagging_follower += 1;
            }
            if next.value.is_none() {
                second.vanished += 1;
            }
        }
        set.mark_up(AHEAD);
        outcomes.push(second);
    }
    unwrap(
        "resume replay",
        topology.resume_follower_replay(FROZEN).await,
    );
    let (with, without) = (&outcomes[0], &outcomes[1]);
    assert_eq!(
        (with.lagging_follower, with.vanished),
        (0, 0),
        "with monotonic reads, a second read never goes back behind the first: {with:?}"
    );
    assert!(
        without.vanished > 0,
        "without monotonic reads no row vanished ({without:?}): the frozen follower was not \
         read, so this test proves nothing"
    );
    eprintln!(
        "monotonic_reads_record_an_upper_bound: with monotonic reads 0 of {} second reads went \
         back in time; without, {} of {} did",
        READERS * 2,
        without.vanished,
        READERS * 2
    );
}
