//! Causal mode (`CausalRouter`: reads go to a follower that has replayed what the scope needs,
//! by WAL position) through `DistributedPool`, against the real leader and followers that
//! `cargo xtask integration-test` shares between tests (skipped without them).
//!
//! What every adapter must do in causal mode (read-your-writes, reads back on caught-up
//! followers, the on-demand check, monotonic reads, a token in a job's payload) is in the
//! conformance suite (`tests/conformance.rs`); what is here is about tokens themselves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distributed_sqlx::DistributedPool;
use distributed_sqlx::distributed_core::{
    CausalRouter, CausalTracker, Config, ConsistencyToken, MemoryCache, Scope, TokenError,
    TokenSigner, WalPosition, with_scope,
};
use distributed_sqlx::sqlx::{self, AssertSqlSafe};
use distributed_testkit::{EnvRig, rig_or_skip};

type Pool = DistributedPool<Arc<CausalRouter<MemoryCache>>>;

const LAG_WINDOW: Duration = Duration::from_secs(30);
const KEY: &[u8] = b"causal-test signing key, 32+ bytes long";

async fn connect(rig: &EnvRig) -> Pool {
    let mut builder = Config::builder()
        .leader("leader", rig.leader_url())
        .lag_window(LAG_WINDOW)
        .probe_interval(Duration::from_millis(100))
        .probe_backoff_max(Duration::from_secs(1))
        .readmit_ramp(Duration::from_secs(1));
    for (index, url) in rig.follower_urls().iter().enumerate() {
        builder = builder.follower(format!("follower-{index}"), url.as_str());
    }
    let config = builder.build().expect("a valid configuration");
    let tracker = CausalTracker::new(MemoryCache::new(), config.lag_window());
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

/// Whether row `id` is where the router sends the current scope.
async fn found(pool: &Pool, table: &str, id: i64) -> bool {
    let mut conn = pool.read().await.expect("a read connection");
    let sql = format!("select id from {table} where id = $1");
    let found: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .expect("read");
    found == Some(id)
}

/// Forged, truncated and garbage tokens are refused with typed errors before they route
///    anything; a genuine token from a real write still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_truncated_and_garbage_tokens_are_refused() {
    let Some(rig) = rig_or_skip("forged_truncated_and_garbage_tokens_are_refused") else {
        return;
    };
    let pool = connect(&rig).await;
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
    assert!(
        with_scope(job, found(&pool, &table, 1)).await,
        "a job with the genuine token reads the write"
    );
}
