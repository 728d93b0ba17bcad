//! Save latency of the write-behind store against write-through (what tower-sessions'
//! `CachingSessionStore` does: cache and database written together, the request waiting for
//! both), with the leader behind a TCP proxy adding 50 ms to every round trip.
//!
//! Needs a rig: `cargo xtask topology up`, load its state file, then
//! `cargo bench -p distributed-session --all-features --bench save_latency`.
//! Without one it prints a line and exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "sqlx")]
fn main() {
    bench::run();
}

#[cfg(not(feature = "sqlx"))]
fn main() {
    eprintln!("save_latency: needs --features sqlx (or --all-features)");
}

#[cfg(feature = "sqlx")]
mod bench {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant, SystemTime};

    use std::sync::Arc;

    use distributed_core::{Cache, MemoryCache};
    use distributed_memcache::MemcacheCache;
    use distributed_session::{
        PgSessions, SessionDatabase, SessionId, SessionRecord, SessionRow, WriteBehindStore,
    };
    use distributed_testkit::DelayProxy;
    use sqlx::postgres::PgPoolOptions;
    use sqlx::{AssertSqlSafe, PgPool};

    const SAMPLES: usize = 300;
    const WARMUP: usize = 30;
    const SESSIONS: usize = 100;

    pub(super) fn run() {
        let Ok(leader_url) = std::env::var("DISTRIBUTED_LEADER_URL") else {
            eprintln!("save_latency: skipped (DISTRIBUTED_LEADER_URL unset; see the file's doc)");
            return;
        };
        let one_way = std::env::var("SESSION_BENCH_ONE_WAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_millis(25), Duration::from_millis);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(measure(&leader_url, one_way));
    }

    fn upstream(url: &str) -> SocketAddr {
        let host_port = url
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("postgres://user@host:port/db");
        host_port.parse().expect("a numeric host:port")
    }

    async fn measure(leader_url: &str, one_way: Duration) {
        let proxy = DelayProxy::start(upstream(leader_url), one_way)
            .await
            .unwrap();
        // No ping before each acquire: the baseline pays only its own statement's round trip.
        let far_leader: PgPool = PgPoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect(&proxy.url_for(leader_url).unwrap())
            .await
            .unwrap();
        let table = format!(
            "sess_bench_{}",
            SessionId::generate().to_string()[..8]
                .to_ascii_lowercase()
                .replace('-', "_")
        );
        let db = PgSessions::with_table(far_leader.clone(), &table).unwrap();
        db.migrate().await.unwrap();
        let mut caches: Vec<(&str, Arc<dyn Cache>)> =
            vec![("in-process MemoryCache", Arc::new(MemoryCache::new()))];
        if let Ok(addr) = std::env::var("DISTRIBUTED_MEMCACHED_ADDR") {
            let namespace = format!("bench-{}:", SessionId::generate());
            let memcached = MemcacheCache::builder()
                .server(addr)
                .namespace(namespace)
                .build()
                .unwrap();
            caches.push(("memcached (loopback)", Arc::new(memcached)));
        }
        println!(
            "save latency, leader behind a proxy adding {:?} per round trip, {SAMPLES} saves each \
             (after {WARMUP} warm-up saves), write-behind and write-through alternating",
            one_way * 2
        );
        println!();
        println!("| cache | store | p50 | p99 |");
        println!("|---|---|---|---|");
        for (name, cache) in caches {
            let (behind, through) = compare(&db, cache).await;
            let (b50, b99) = behind;
            let (t50, t99) = through;
            println!(
                "| {name} | write-through (like CachingSessionStore) | {t50:.2?} | {t99:.2?} |"
            );
            println!("| {name} | write-behind (WriteBehindStore) | {b50:.2?} | {b99:.2?} |");
            println!(
                "| {name} | **ratio write-through / write-behind** | **{:.0}x** | {:.0}x |",
                t50.as_secs_f64() / b50.as_secs_f64(),
                t99.as_secs_f64() / b99.as_secs_f64()
            );
        }
        let sql = format!("DROP TABLE {table}");
        sqlx::query(AssertSqlSafe(sql))
            .execute(&far_leader)
            .await
            .unwrap();
    }

    /// p50 and p99 of write-behind and of write-through saves over `cache`.
    async fn compare(
        db: &PgSessions<PgPool>,
        cache: Arc<dyn Cache>,
    ) -> ((Duration, Duration), (Duration, Duration)) {
        let write_behind = WriteBehindStore::builder(cache.clone(), db.clone())
            .build()
            .unwrap();
        let mut sessions: Vec<SessionRecord> = (0..SESSIONS)
            .map(|i| {
                let mut r = SessionRecord::new(Duration::from_secs(3600));
                r.data.insert("user".into(), i.into());
                r.data
                    .insert("cart".into(), serde_json::json!(["book", "pen"]));
                r
            })
            .collect();
        let (mut behind, mut through) = (Vec::new(), Vec::new());
        for i in 0..WARMUP + SAMPLES {
            let record = &mut sessions[i % SESSIONS];
            record.data.insert("n".into(), i.into());
            // Alternate, so both see the same network and server conditions.
            let started = Instant::now();
            write_behind.save(record).await.unwrap();
            let b = started.elapsed();
            let started = Instant::now();
            write_through(&*cache, db, record, i as u64).await;
            let t = started.elapsed();
            if i >= WARMUP {
                behind.push(b);
                through.push(t);
            }
        }
        write_behind.shutdown().await.unwrap();
        (
            (percentile(&mut behind, 50), percentile(&mut behind, 99)),
            (percentile(&mut through, 50), percentile(&mut through, 99)),
        )
    }

    /// The baseline: the request waits for the cache and the database, written together.
    async fn write_through(
        cache: &dyn Cache,
        db: &PgSessions<PgPool>,
        record: &SessionRecord,
        version: u64,
    ) {
        let json = serde_json::to_vec(&record.data).unwrap();
        // Rows and keys of its own, so the baseline never meets the engine's versions.
        let id = SessionId::from_i128(record.id.to_i128() ^ 1);
        let row = SessionRow {
            id: &id,
            version: version + 1,
            data: Some(&json),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        };
        let key = format!("bench:through:{id}");
        let rows = [row];
        let (cached, written) = tokio::join!(
            cache.set(&key, &json, Duration::from_secs(3600)),
            db.write(&rows)
        );
        cached.unwrap();
        written.unwrap();
    }

    fn percentile(samples: &mut [Duration], p: usize) -> Duration {
        samples.sort_unstable();
        samples[(samples.len() * p / 100).min(samples.len() - 1)]
    }
}
