//! Causal mode (`CausalRouter`: reads go to a follower that has replayed what the scope needs,
//! by WAL position) through `DistributedPool`, against the real leader and followers that
//! `cargo xtask integration-test` shares between tests (skipped without them).
//!
//! The followers apply the leader's log a fixed delay late (1 s under the xtask); the lag
//! window is set far longer (30 s), so every read these tests see served by a follower was
//! sent there by position, not by the window expiring.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distributed_sqlx::DistributedPool;
use distributed_sqlx::distributed_core::{
    CausalRouter, CausalTracker, Config, ConsistencyToken, Freshness, MemoryCache, Reason, Scope,
    Target, TokenError, TokenSigner, WalPosition, current_scope, with_scope,
};
use distributed_sqlx::sqlx::{self, AssertSqlSafe};
use futures_util::StreamExt;
use tokio::time::{Instant, sleep};

type Pool = DistributedPool<Arc<CausalRouter<MemoryCache>>>;

const LAG_WINDOW: Duration = Duration::from_secs(30);
const KEY: &[u8] = b"causal-test signing key, 32+ bytes long";

/// The shared rig, as `distributed-testkit` describes it in the environment.
struct Rig {
    leader: String,
    followers: Vec<String>,
}

/// The rig, or `None` after a line saying why; a panic when the xtask requires it.
fn rig_or_skip(test: &str) -> Option<Rig> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(leader) = var("DISTRIBUTED_LEADER_URL") else {
        let required = var("DISTRIBUTED_REQUIRE_RIG").is_some_and(|v| v != "0" && v != "false");
        assert!(
            !required,
            "{test}: DISTRIBUTED_LEADER_URL unset, but DISTRIBUTED_REQUIRE_RIG is set"
        );
        eprintln!("{test}: skipped: set by cargo xtask integration-test");
        return None;
    };
    let followers: Vec<String> = var("DISTRIBUTED_FOLLOWER_URLS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!followers.is_empty(), "{test}: the rig has no followers");
    Some(Rig { leader, followers })
}

async fn connect(rig: &Rig, monotonic: bool) -> Pool {
    let mut builder = Config::builder()
        .leader("leader", rig.leader.as_str())
        .lag_window(LAG_WINDOW)
        .probe_interval(Duration::from_millis(100))
        .probe_backoff_max(Duration::from_secs(1))
        .readmit_ramp(Duration::from_secs(1));
    for (index, url) in rig.followers.iter().enumerate() {
        builder = builder.follower(format!("follower-{index}"), url.as_str());
    }
    let config = builder.build().expect("a valid configuration");
    let tracker =
        CausalTracker::new(MemoryCache::new(), config.lag_window()).monotonic_reads(monotonic);
    let router = Arc::new(CausalRouter::new(config.clone(), tracker));
    DistributedPool::builder(config, router)
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .follower_acquire_timeout(Duration::from_millis(500))
        .track_commit_position(true)
        .connect()
        .await
        .expect("the pool starts")
}

/// A table no other test, binary or run uses.
fn unique(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "causal_{test}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn create_table(pool: &Pool, table: &str) {
    let ddl = format!("create table {table} (id bigint primary key)");
    sqlx::query(AssertSqlSafe(ddl))
        .execute(pool.leader())
        .await
        .expect("create table");
}

async fn write(pool: &Pool, table: &str, id: i64) {
    let sql = format!("insert into {table} (id) values ($1)");
    pool.execute(sqlx::query(AssertSqlSafe(sql)).bind(id))
        .await
        .expect("write");
}

/// Reads row `id` where the router sends the current scope: whether it was there, and where.
async fn read(pool: &Pool, table: &str, id: i64) -> (bool, Target, Reason) {
    let mut conn = pool.read().await.expect("a read connection");
    let sql = format!("select id from {table} where id = $1");
    let found: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .expect("read");
    let decision = conn.decision();
    (found == Some(id), decision.target, decision.reason)
}

/// Waits until the followers have replayed what the leader did before the call, as the pool's
/// monitor sees it.
async fn settle(pool: &Pool) {
    let target = pool.leader_position().await.expect("the leader's position");
    let deadline = Instant::now() + Duration::from_secs(20);
    let followers = pool.followers();
    while (0..followers.len()).any(|i| followers.replayed(i).is_none_or(|p| p < target)) {
        assert!(Instant::now() < deadline, "the followers never caught up");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the monitor has seen the leader at `position` or later.
async fn monitor_sees_leader_at(pool: &Pool, position: WalPosition) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool
        .followers()
        .leader_position()
        .is_none_or(|p| p < position)
    {
        assert!(
            Instant::now() < deadline,
            "the monitor never saw the leader"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// 1. Read-your-writes in causal mode: 200 scopes each write a row and read it back at once,
///    then again in a later request once the followers have it: 0 misses, and the later reads
///    are served by followers (by position: the lag window is 30 s). Scopes that did not write
///    read the fresh rows from followers and miss some: the lag is real, the test could fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_in_causal_mode() {
    let Some(rig) = rig_or_skip("read_your_writes_in_causal_mode") else {
        return;
    };
    let pool = connect(&rig, true).await;
    let table = unique("ryw");
    create_table(&pool, &table).await;
    settle(&pool).await;

    let own_misses = AtomicUsize::new(0);
    let (observer_follower_reads, observer_misses) = (AtomicUsize::new(0), AtomicUsize::new(0));
    futures_util::stream::iter(0..200_i64)
        .for_each_concurrent(16, |id| {
            let (pool, table) = (&pool, table.as_str());
            let (own_misses, observer_follower_reads, observer_misses) =
                (&own_misses, &observer_follower_reads, &observer_misses);
            async move {
                with_scope(Scope::new(format!("{table}:writer-{id}")), async {
                    if id % 2 == 0 {
                        write(pool, table, id).await;
                    } else {
                        let mut tx = pool.begin().await.expect("begin");
                        let sql = format!("insert into {table} (id) values ($1)");
                        sqlx::query(AssertSqlSafe(sql))
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .expect("insert");
                        tx.commit().await.expect("commit");
                    }
                    let (found, target, reason) = read(pool, table, id).await;
                    if !found {
                        own_misses.fetch_add(1, Ordering::SeqCst);
                        eprintln!("writer {id} missed its own row on {target:?} ({reason})");
                    }
                })
                .await;
                with_scope(Scope::new(format!("{table}:observer-{id}")), async {
                    let (found, target, _) = read(pool, table, id).await;
                    if let Target::Follower(_) = target {
                        observer_follower_reads.fetch_add(1, Ordering::SeqCst);
                        if !found {
                            observer_misses.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
                .await;
            }
        })
        .await;

    // Later requests of the writers, once the followers have every row (but long before the
    // lag window would end).
    settle(&pool).await;
    let later_follower_reads = AtomicUsize::new(0);
    futures_util::stream::iter(0..200_i64)
        .for_each_concurrent(16, |id| {
            let (pool, table) = (&pool, table.as_str());
            let (own_misses, later_follower_reads) = (&own_misses, &later_follower_reads);
            with_scope(Scope::new(format!("{table}:writer-{id}")), async move {
                let (found, target, reason) = read(pool, table, id).await;
                if !found {
                    own_misses.fetch_add(1, Ordering::SeqCst);
                    eprintln!("writer {id} missed its row later on {target:?} ({reason})");
                }
                if let Target::Follower(_) = target {
                    assert_eq!(reason, Reason::CaughtUpFollower);
                    later_follower_reads.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .await;

    let own_misses = own_misses.into_inner();
    let (follower_reads, misses) = (
        observer_follower_reads.into_inner(),
        observer_misses.into_inner(),
    );
    let later = later_follower_reads.into_inner();
    assert_eq!(own_misses, 0, "stale own-writes: {own_misses}");
    assert!(
        misses > 0,
        "no scope that did not write missed a fresh row ({follower_reads} follower reads): \
         the followers do not lag, so this test proves nothing"
    );
    assert!(
        later >= 150,
        "once the followers have the rows, writers read them there; only {later} of 200 did"
    );
    eprintln!(
        "read_your_writes_in_causal_mode: 0 of 400 own-write misses; {later} of 200 later reads \
         by followers; {misses} of {follower_reads} follower reads by other scopes missed the row"
    );
}

/// 2. Monotonic reads: a scope that saw a fresh row on the leader (a forced read) does not see
///    it vanish on its next request, although the followers (1 s behind) do not have it yet:
///    that read goes to the leader. The same steps through a router with monotonic reads off
///    go to a follower and miss the row — so the check can fail. Once the followers have the
///    row, the scope reads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_reads_do_not_go_back_in_time() {
    let Some(rig) = rig_or_skip("monotonic_reads_do_not_go_back_in_time") else {
        return;
    };
    let (monotonic, plain) = (connect(&rig, true).await, connect(&rig, false).await);
    let table = unique("monotonic");
    create_table(&monotonic, &table).await;
    settle(&monotonic).await;
    settle(&plain).await;

    let (mut vanished, mut vanished_without) = (0, 0);
    for id in 0..5_i64 {
        // Someone else writes a row; the monitors see the leader past it.
        with_scope(Scope::new(format!("{table}:author")), async {
            write(&monotonic, &table, id).await;
        })
        .await;
        let written = monotonic.leader_position().await.expect("position");
        monitor_sees_leader_at(&monotonic, written).await;
        monitor_sees_leader_at(&plain, written).await;

        for (pool, label, vanished) in [
            (&monotonic, "monotonic", &mut vanished),
            (&plain, "plain", &mut vanished_without),
        ] {
            let reader = format!("{table}:{label}-reader-{id}");
            // A request that reads the leader and sees the row.
            with_scope(Scope::new(reader.clone()), async {
                let mut conn = pool.read_leader().await.expect("a leader connection");
                let sql = format!("select count(*) from {table} where id = $1");
                let seen: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await
                    .expect("read");
                assert_eq!(seen, 1, "the leader has the row");
            })
            .await;
            // The same scope's next request, while the followers are still behind.
            with_scope(Scope::new(reader), async {
                let (found, target, reason) = read(pool, &table, id).await;
                if !found {
                    *vanished += 1;
                    eprintln!("row {id} vanished on {target:?} ({reason})");
                }
            })
            .await;
        }
    }
    assert_eq!(
        vanished, 0,
        "with monotonic reads, a seen row never vanishes"
    );
    assert!(
        vanished_without > 0,
        "without monotonic reads no seen row vanished: the followers do not lag, so this test \
         proves nothing"
    );

    // Once the followers have the rows, the scope reads followers again.
    settle(&monotonic).await;
    let reader = format!("{table}:monotonic-reader-4");
    with_scope(Scope::new(reader), async {
        let (found, target, reason) = read(&monotonic, &table, 4).await;
        assert!(found);
        assert!(
            matches!(target, Target::Follower(_)),
            "caught-up followers serve the scope again, got {target:?} ({reason})"
        );
    })
    .await;
    eprintln!(
        "monotonic_reads_do_not_go_back_in_time: 0 of 5 seen rows vanished; without monotonic \
         reads {vanished_without} of 5 did"
    );
}

/// 3. A consistency token in a job's payload: a request writes a row and enqueues a job with
///    its signed token; a worker task with no session reads the row with it, every time. The
///    same worker reading without the token misses some rows: the followers lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_job_payload_reads_the_write() {
    let Some(rig) = rig_or_skip("a_token_in_a_job_payload_reads_the_write") else {
        return;
    };
    let pool = connect(&rig, true).await;
    let table = unique("job");
    create_table(&pool, &table).await;
    settle(&pool).await;
    let signer = TokenSigner::new(KEY).expect("a key");

    let (jobs, mut queue) = tokio::sync::mpsc::channel::<String>(64);
    let worker = {
        let (pool, table, signer) = (pool.clone(), table.clone(), signer.clone());
        tokio::spawn(async move {
            let (mut misses, mut misses_without_token, mut done) = (0, 0, 0);
            while let Some(payload) = queue.recv().await {
                // The payload: `<id> <token>`, as a job queue would carry it.
                let (id, token) = payload.split_once(' ').expect("a payload");
                let id: i64 = id.parse().expect("an id");
                assert!(current_scope().is_none());
                let (found, _, _) = read(&pool, &table, id).await;
                if !found {
                    misses_without_token += 1;
                }
                let token = signer.verify(token).expect("a genuine token");
                let (found, target, reason) =
                    with_scope(Scope::from_token(&token), read(&pool, &table, id)).await;
                if !found {
                    misses += 1;
                    eprintln!("job {id} missed the row on {target:?} ({reason})");
                }
                done += 1;
            }
            (misses, misses_without_token, done)
        })
    };
    for id in 0..50_i64 {
        let request = Scope::new(format!("{table}:user-{id}"));
        with_scope(request.clone(), write(&pool, &table, id)).await;
        let token = pool.router().token(&request).await.expect("a token");
        assert!(
            matches!(token.freshness(), Freshness::AtLeast(_)),
            "a write of known position gives a position token, got {token}"
        );
        jobs.send(format!("{id} {}", signer.sign(&token)))
            .await
            .expect("the worker is running");
    }
    drop(jobs);
    let (misses, misses_without_token, done) = worker.await.expect("the worker");
    assert_eq!(done, 50);
    assert_eq!(
        misses, 0,
        "jobs with the token missed {misses} of 50 writes"
    );
    assert!(
        misses_without_token > 0,
        "jobs without the token missed nothing: the followers do not lag, so this test proves \
         nothing"
    );
    eprintln!(
        "a_token_in_a_job_payload_reads_the_write: 0 of 50 misses with the token, \
         {misses_without_token} of 50 without"
    );
}

/// 4. Forged, truncated and garbage tokens are refused with typed errors before they route
///    anything; a genuine token from a real write still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_truncated_and_garbage_tokens_are_refused() {
    let Some(rig) = rig_or_skip("forged_truncated_and_garbage_tokens_are_refused") else {
        return;
    };
    let pool = connect(&rig, true).await;
    let table = unique("tokens");
    create_table(&pool, &table).await;
    let signer = TokenSigner::new(KEY).expect("a key");
    let request = Scope::new(format!("{table}:user"));
    with_scope(request.clone(), write(&pool, &table, 1)).await;
    let token = pool.router().token(&request).await.expect("a token");
    let signed = signer.sign(&token);
    let (unsigned, signature) = signed.rsplit_once('.').expect("a signed token");

    // Garbage.
    for (garbage, expected) in [
        ("", TokenError::Empty),
        ("hello", TokenError::UnsupportedVersion),
        (
            "v2.10.AAAAAAAAAAAAAAAAAAAAAA",
            TokenError::UnsupportedVersion,
        ),
        ("v1", TokenError::Malformed),
        ("v1.1;drop table x", TokenError::Malformed),
        ("v1.zz.AAAAAAAAAAAAAAAAAAAAAA", TokenError::BadSignature),
    ] {
        assert_eq!(signer.verify(garbage), Err(expected), "{garbage:?}");
    }
    assert_eq!(
        signer.verify(&"v1.".repeat(40)),
        Err(TokenError::TooLong(120))
    );
    // Truncated: every prefix is refused.
    for cut in 0..signed.len() {
        assert!(signer.verify(&signed[..cut]).is_err(), "{}", &signed[..cut]);
    }
    assert_eq!(signer.verify(unsigned), Err(TokenError::Unsigned));
    // Forged: another position or the leader under the genuine signature, a flipped signature
    // byte, or a token signed with another key.
    let forged_position = ConsistencyToken::at_least(WalPosition(u64::MAX)).to_string();
    for forged in [
        format!("{forged_position}.{signature}"),
        format!("v1.L.{signature}"),
        format!(
            "{unsigned}.{}{}",
            if signature.starts_with('A') { 'B' } else { 'A' },
            &signature[1..]
        ),
        TokenSigner::new(b"an attacker's key, 32 bytes or more")
            .expect("a key")
            .sign(&ConsistencyToken::leader()),
    ] {
        assert_eq!(
            signer.verify(&forged),
            Err(TokenError::BadSignature),
            "{forged}"
        );
    }
    // The genuine token reads the write.
    let job = Scope::from_token(&signer.verify(&signed).expect("the genuine token"));
    let (found, _, _) = with_scope(job, read(&pool, &table, 1)).await;
    assert!(found, "a job with the genuine token reads the write");
}
