//! The session engine against real servers (`cargo xtask integration-test`; skipped without a
//! rig): a PostgreSQL leader with followers 1 s behind, and a cache that can be switched off.
#![cfg(all(
    feature = "sqlx",
    feature = "bb8",
    feature = "tower",
    feature = "tower-sessions"
))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use distributed_core::{Cache, MemoryCache};
use distributed_memcache::MemcacheCache;
use distributed_session::{
    PgSessions, SessionData, SessionDatabase, SessionError, SessionId, SessionRecord, SessionRow,
    StoredSession, WriteBehindStore,
};
use distributed_testkit::{
    EnvRig, TopologyOptions, memcached_or_skip, private_topology_or_skip, rig_or_skip,
};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Test doubles and helpers

/// A shared cache that can be switched off, as when memcached stops or the network to it
/// fails. Counts its calls.
type SwitchableCache = distributed_core::SwitchableCache<Arc<dyn Cache>>;

fn switchable(inner: impl Cache + 'static) -> SwitchableCache {
    SwitchableCache::new(Arc::new(inner))
}

/// A real database whose next write can be held at a gate (a slow or stuck batch), and that
/// counts loads and writes.
#[derive(Clone)]
struct Gated<D> {
    inner: D,
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    loads: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

impl<D> Gated<D> {
    fn new(inner: D) -> Self {
        Self {
            inner,
            gate: Arc::default(),
            loads: Arc::default(),
            writes: Arc::default(),
        }
    }
    fn hold_next_write(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.gate.lock().unwrap() = Some(rx);
        tx
    }
}

#[async_trait]
impl<D: SessionDatabase> SessionDatabase for Gated<D> {
    async fn migrate(&self) -> Result<(), SessionError> {
        self.inner.migrate().await
    }
    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(id).await
    }
    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        self.inner.write(rows).await
    }
    async fn delete_expired(&self) -> Result<u64, SessionError> {
        self.inner.delete_expired().await
    }
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .unwrap()
}

/// A table of this test's own on the shared leader.
async fn table(pool: &PgPool, test: &str) -> PgSessions<PgPool> {
    let name = format!(
        "sess_{test}_{}",
        &SessionId::generate().to_string()[..8].to_ascii_lowercase()
    )
    .replace('-', "_");
    let db = PgSessions::with_table(pool.clone(), &name).unwrap();
    db.migrate().await.unwrap();
    db
}

async fn drop_table(pool: &PgPool, db: &PgSessions<PgPool>) {
    let sql = format!("DROP TABLE IF EXISTS {}", db.table());
    sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
}

/// Every live row of the table, read from `pool` directly: id -> (version, data).
async fn rows(pool: &PgPool, table: &str) -> HashMap<String, (i64, SessionData)> {
    let sql = format!("SELECT id, version, data FROM {table} WHERE data IS NOT NULL");
    let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(id, version, data)| (id, (version, serde_json::from_slice(&data).unwrap())))
        .collect()
}

fn session(data: serde_json::Value) -> SessionRecord {
    let mut record = SessionRecord::new(Duration::from_secs(3600));
    record.data = data.as_object().unwrap().clone();
    record
}

// ---------------------------------------------------------------------------------------------
// The database trait, against both drivers

async fn database_conformance(db: &dyn SessionDatabase) {
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    let id = SessionId::generate();
    let later = SystemTime::now() + Duration::from_secs(600);
    let row = |version, data: Option<&'static [u8]>| SessionRow {
        id: &id,
        version,
        data,
        expires_at: later,
    };
    assert!(db.load(&id).await.unwrap().is_none());
    assert_eq!(db.write(&[row(10, Some(b"{\"v\":10}"))]).await.unwrap(), 1);
    assert_eq!(db.write(&[row(9, Some(b"{\"v\":9}"))]).await.unwrap(), 0);
    let loaded = db.load(&id).await.unwrap().unwrap();
    assert_eq!(loaded.version, 10);
    assert_eq!(loaded.data.as_deref(), Some(&b"{\"v\":10}"[..]));
    let drift = loaded
        .expires_at
        .duration_since(later)
        .unwrap_or_else(|e| e.duration());
    assert!(drift < Duration::from_millis(2), "{drift:?}");
    assert_eq!(db.write(&[row(11, None)]).await.unwrap(), 1);
    assert_eq!(db.write(&[row(12, Some(b"{}"))]).await.unwrap(), 0);
    assert!(db.load(&id).await.unwrap().unwrap().data.is_none());
    // A batch: distinct ids, each under the guard.
    let ids: Vec<SessionId> = (0..300).map(|_| SessionId::generate()).collect();
    let batch: Vec<SessionRow<'_>> = ids
        .iter()
        .map(|id| SessionRow {
            id,
            version: 1,
            data: Some(b"{}"),
            expires_at: SystemTime::now() - Duration::from_secs(1),
        })
        .collect();
    assert_eq!(db.write(&batch).await.unwrap(), 300);
    assert!(db.delete_expired().await.unwrap() >= 300);
    assert!(db.load(&ids[0]).await.unwrap().is_none());
    assert!(db.load(&id).await.unwrap().is_some(), "not expired");
}

#[tokio::test]
async fn both_drivers_keep_the_version_guard_and_final_tombstones() {
    let Some(rig) = rig_or_skip("both_drivers_keep_the_version_guard_and_final_tombstones") else {
        return;
    };
    let leader = pool(rig.leader_url()).await;
    let with_sqlx = table(&leader, "conf_sqlx").await;
    database_conformance(&with_sqlx).await;

    let manager = bb8_postgres::PostgresConnectionManager::new_from_stringlike(
        rig.leader_url(),
        tokio_postgres::NoTls,
    )
    .unwrap();
    let bb8_pool = bb8::Pool::builder()
        .max_size(4)
        .build(manager)
        .await
        .unwrap();
    let name = format!("{}_bb8", with_sqlx.table());
    let with_bb8 = PgSessions::with_table(bb8_pool, &name).unwrap();
    database_conformance(&with_bb8).await;

    // The two drivers read each other's rows.
    let id = SessionId::generate();
    let row = SessionRow {
        id: &id,
        version: 7,
        data: Some(b"{\"k\":1}"),
        expires_at: SystemTime::now() + Duration::from_secs(60),
    };
    with_bb8.write(&[row]).await.unwrap();
    let same_table = PgSessions::with_table(leader.clone(), &name).unwrap();
    assert_eq!(same_table.load(&id).await.unwrap().unwrap().version, 7);

    drop_table(&leader, &with_sqlx).await;
    drop_table(&leader, &same_table).await;
}

// ---------------------------------------------------------------------------------------------
// 1. Logins read back at once, with followers 1 s behind

#[tokio::test]
async fn five_hundred_logins_read_back_at_once_are_never_lost() {
    let Some(rig) = rig_or_skip("five_hundred_logins_read_back_at_once_are_never_lost") else {
        return;
    };
    logins(&rig, switchable(MemoryCache::new())).await;
}

#[tokio::test]
async fn five_hundred_logins_through_memcached_are_never_lost() {
    let test = "five_hundred_logins_through_memcached_are_never_lost";
    let (Some(rig), Some(memcached)) = (rig_or_skip(test), memcached_or_skip(test)) else {
        return;
    };
    let cache = MemcacheCache::builder()
        .server(memcached)
        .namespace(format!("t1-{}:", SessionId::generate()))
        .build()
        .unwrap();
    logins(&rig, switchable(cache)).await;
}

async fn logins(rig: &EnvRig, cache: SwitchableCache) {
    assert!(!rig.follower_urls().is_empty(), "the rig needs a follower");
    let leader = pool(rig.leader_url()).await;
    let follower = pool(&rig.follower_urls()[0]).await;
    let db = table(&leader, "logins").await;
    // The login request runs on one app server, the next request on another: they share
    // only the cache and the database.
    let login_server = WriteBehindStore::builder(cache.clone(), db.clone())
        .build()
        .unwrap();
    let next_server = WriteBehindStore::builder(cache.clone(), db.clone())
        .build()
        .unwrap();
    // The table itself must have reached the follower before it can be asked anything.
    let exists = format!("SELECT to_regclass('{}') IS NOT NULL", db.table());
    for attempt in 0.. {
        let found: bool = sqlx::query_scalar(AssertSqlSafe(exists.clone()))
            .fetch_one(&follower)
            .await
            .unwrap();
        if found {
            break;
        }
        assert!(attempt < 100, "the table never reached the follower");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let naive_sql: Arc<str> = format!(
        "SELECT count(*) FROM {} WHERE id = $1 AND data IS NOT NULL",
        db.table()
    )
    .into();

    // Phase one: the cache is up. Phase two: the cache is down (or evicted the session), so
    // the next request must find the session in the database: on the leader.
    for cache_down in [false, true] {
        cache.set_down(cache_down);
        let lost = Arc::new(AtomicU64::new(0));
        let naive_lost = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..8u64 {
            let (login_server, next_server, follower) =
                (login_server.clone(), next_server.clone(), follower.clone());
            let (lost, naive_lost, naive_sql) =
                (lost.clone(), naive_lost.clone(), naive_sql.clone());
            tasks.spawn(async move {
                for i in (worker..500).step_by(8) {
                    let anonymous = session(json!({ "cart": [i] }));
                    login_server.save(&anonymous).await.unwrap();
                    let mut login = anonymous.clone();
                    login.data.insert("user".into(), json!(i));
                    let logged_in = login_server.cycle_id(&login).await.unwrap();
                    // The very next request.
                    let read = next_server.load(&logged_in.id).await.unwrap();
                    if read.is_none_or(|r| r.data.get("user") != Some(&json!(i))) {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    assert!(
                        next_server.load(&anonymous.id).await.unwrap().is_none(),
                        "the pre-login session is gone"
                    );
                    // What a store reading a follower would have seen at the same moment.
                    let on_follower: i64 = sqlx::query_scalar(AssertSqlSafe(naive_sql.clone()))
                        .bind(logged_in.id.to_string())
                        .fetch_one(&follower)
                        .await
                        .unwrap();
                    if on_follower == 0 {
                        naive_lost.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        while let Some(task) = tasks.join_next().await {
            task.unwrap();
        }
        let (lost, naive_lost) = (
            lost.load(Ordering::SeqCst),
            naive_lost.load(Ordering::SeqCst),
        );
        eprintln!(
            "cache {}: 500 logins, {lost} lost; a follower-backed load would have lost {naive_lost}",
            if cache_down { "down" } else { "up" }
        );
        assert_eq!(lost, 0, "sessions lost or logged out");
        assert!(
            naive_lost > 0,
            "the follower had every session at once: this test could not catch a follower read"
        );
    }
    let stats = login_server.stats();
    assert!(stats.written_through >= 500, "{stats:?}");
    login_server.shutdown().await.unwrap();
    next_server.shutdown().await.unwrap();
    assert_eq!(rows(&leader, db.table()).await.len(), 1000);
    drop_table(&leader, &db).await;
}

// ---------------------------------------------------------------------------------------------
// 2. The leader stopped for 10 s while 1,000 sessions are saved

#[tokio::test]
async fn a_thousand_saves_survive_ten_seconds_without_the_leader() {
    let opts = TopologyOptions {
        followers: 0,
        ..TopologyOptions::default()
    };
    let Some(topology) = private_topology_or_skip(
        "a_thousand_saves_survive_ten_seconds_without_the_leader",
        opts,
    )
    .await
    .unwrap() else {
        return;
    };
    let leader = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(topology.leader_url())
        .await
        .unwrap();
    let db = PgSessions::new(leader.clone());
    db.migrate().await.unwrap();
    let dead = Arc::new(AtomicU64::new(0));
    let store = WriteBehindStore::builder(MemoryCache::new(), db.clone())
        .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .db_timeout(Duration::from_secs(3))
        .give_up_after(Duration::from_secs(120))
        .on_dead_write({
            let dead = dead.clone();
            move |_| {
                dead.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();

    let mut sessions: Vec<SessionRecord> = (0..1000)
        .map(|i| session(json!({ "n": i, "rev": 0 })))
        .collect();
    topology.stop_leader().await.unwrap();
    let down_at = Instant::now();
    // 1,000 sessions over about 10 s, each saved twice: the second save is the one that counts.
    for (i, record) in sessions.iter_mut().enumerate() {
        store.save(record).await.unwrap();
        record.data.insert("rev".into(), json!(1));
        store.save(record).await.unwrap();
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Reads keep working from the outbox while the leader is away.
        let read = store.load(&record.id).await.unwrap().unwrap();
        assert_eq!(read.data["rev"], 1);
    }
    let down_for = down_at.elapsed();
    let stats = store.stats();
    assert!(stats.failed_attempts > 0, "{stats:?}");
    assert_eq!(stats.pending, 1000, "{stats:?}");
    topology.start_leader().await.unwrap();
    eprintln!("leader down for {down_for:?}; {stats:?}");

    tokio::time::timeout(Duration::from_secs(120), store.flush())
        .await
        .expect("flush within 2 minutes")
        .unwrap();
    let stored = rows(&leader, db.table()).await;
    assert_eq!(stored.len(), 1000);
    for record in &sessions {
        let (_, data) = &stored[&record.id.to_string()];
        assert_eq!(data, &record.data, "latest data");
    }
    assert_eq!(dead.load(Ordering::SeqCst), 0);
    store.shutdown().await.unwrap();
    leader.close().await;
    topology.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. The cache lost in the middle of a loop of saves and loads

async fn cache_outage_loop(
    leader_url: &str,
    cache: impl Cache + Clone + 'static,
    stop_cache: impl AsyncFnMut(bool),
) {
    let mut stop_cache = stop_cache;
    let leader = pool(leader_url).await;
    let db = table(&leader, "cache_outage").await;
    let servers = [
        WriteBehindStore::builder(cache.clone(), db.clone())
            .build()
            .unwrap(),
        WriteBehindStore::builder(cache.clone(), db.clone())
            .build()
            .unwrap(),
    ];
    let mut sessions: Vec<SessionRecord> = (0..100)
        .map(|i| session(json!({ "n": i, "count": 0 })))
        .collect();
    for record in &sessions {
        servers[0].save(record).await.unwrap();
    }
    for step in 0..1200usize {
        if step == 400 {
            stop_cache(true).await;
        }
        if step == 800 {
            stop_cache(false).await;
        }
        let i = step % sessions.len();
        let writer = &servers[step % 2];
        let reader = &servers[(step / 2) % 2];
        let record = &mut sessions[i];
        let count = record.data["count"].as_u64().unwrap() + 1;
        record.data.insert("count".into(), json!(count));
        writer
            .save(record)
            .await
            .unwrap_or_else(|e| panic!("save failed at step {step}: {e}"));
        let read = reader
            .load(&record.id)
            .await
            .unwrap_or_else(|e| panic!("load failed at step {step}: {e}"))
            .unwrap_or_else(|| panic!("session missing at step {step}"));
        assert_eq!(read.data["count"], count, "stale read at step {step}");
    }
    for server in &servers {
        server.shutdown().await.unwrap();
    }
    let stored = rows(&leader, db.table()).await;
    for record in &sessions {
        assert_eq!(stored[&record.id.to_string()].1, record.data);
    }
    drop_table(&leader, &db).await;
}

/// The cache unreachable but keeping its data (a network partition): when it answers again it
/// holds values older than the database, which must never be served.
#[tokio::test]
async fn cache_outage_in_a_loop_of_saves_and_loads() {
    let Some(rig) = rig_or_skip("cache_outage_in_a_loop_of_saves_and_loads") else {
        return;
    };
    let cache = switchable(MemoryCache::new());
    let switch = cache.clone();
    cache_outage_loop(rig.leader_url(), cache, async move |down| {
        switch.set_down(down)
    })
    .await;
}

/// memcached itself stopped mid-loop, and started again (empty).
#[tokio::test]
async fn memcached_stopped_in_a_loop_of_saves_and_loads() {
    let opts = TopologyOptions {
        followers: 0,
        memcached: true,
        ..TopologyOptions::default()
    };
    let Some(topology) =
        private_topology_or_skip("memcached_stopped_in_a_loop_of_saves_and_loads", opts)
            .await
            .unwrap()
    else {
        return;
    };
    // A stopped memcached costs each call the client's connect timeout: keep it short.
    let cache = MemcacheCache::builder()
        .server(topology.memcached_addr().unwrap())
        .connect_timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    let topology = Arc::new(topology);
    let control = topology.clone();
    cache_outage_loop(topology.leader_url(), cache, async move |down| {
        if down {
            control.stop_memcached().unwrap();
        } else {
            control.start_memcached().await.unwrap();
        }
    })
    .await;
    Arc::into_inner(topology).unwrap().shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Two tasks saving one session at once

#[tokio::test]
async fn concurrent_saves_of_one_session_end_with_the_latest() {
    let Some(rig) = rig_or_skip("concurrent_saves_of_one_session_end_with_the_latest") else {
        return;
    };
    let leader = pool(rig.leader_url()).await;
    let db = table(&leader, "concurrent").await;
    let cache = MemoryCache::new();
    let (slow_db, fast_db) = (Gated::new(db.clone()), Gated::new(db.clone()));
    let a = WriteBehindStore::builder(cache.clone(), slow_db.clone())
        .build()
        .unwrap();
    let b = WriteBehindStore::builder(cache.clone(), fast_db)
        .build()
        .unwrap();
    let record = session(json!({ "by": "nobody" }));
    let id = record.id.to_string();
    let version_sql = format!("SELECT version FROM {} WHERE id = $1", db.table());

    // Deterministic: server a's write is held in flight while b saves a newer version.
    let release = slow_db.hold_next_write();
    let mut older = record.clone();
    older.data.insert("by".into(), json!("a, older"));
    let older_version = a.save(&older).await.unwrap();
    let mut newer = record.clone();
    newer.data.insert("by".into(), json!("b, newer"));
    let newer_version = b.save(&newer).await.unwrap();
    assert!(newer_version > older_version);
    b.flush().await.unwrap();
    drop(release);
    a.flush().await.unwrap();
    let stored = rows(&leader, db.table()).await;
    assert_eq!(stored[&id].0 as u64, newer_version, "the late write lost");
    assert_eq!(stored[&id].1["by"], "b, newer");

    // Racing: two tasks on two servers, 200 saves each, while a reader watches the version.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (leader, watching, sql, id) =
            (leader.clone(), watching.clone(), version_sql, id.clone());
        async move {
            let mut last = 0i64;
            let mut regressions = 0;
            while watching.load(Ordering::SeqCst) {
                let v: i64 = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                    .bind(&id)
                    .fetch_one(&leader)
                    .await
                    .unwrap();
                if v < last {
                    regressions += 1;
                }
                last = last.max(v);
            }
            regressions
        }
    });
    let race = |store: WriteBehindStore<MemoryCache, Gated<PgSessions<PgPool>>>,
                name: &'static str| {
        let mut record = record.clone();
        tokio::spawn(async move {
            let mut saved = Vec::new();
            for n in 0..200 {
                record
                    .data
                    .insert("by".into(), json!(format!("{name} {n}")));
                saved.push((store.save(&record).await.unwrap(), record.data.clone()));
                if n % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            store.flush().await.unwrap();
            saved
        })
    };
    let (from_a, from_b) = tokio::join!(race(a.clone(), "a"), race(b.clone(), "b"));
    watching.store(false, Ordering::SeqCst);
    assert_eq!(
        watcher.await.unwrap(),
        0,
        "the stored version went backwards"
    );
    let all: Vec<_> = from_a.unwrap().into_iter().chain(from_b.unwrap()).collect();
    let (latest_version, latest_data) = all.iter().max_by_key(|(v, _)| *v).unwrap();
    let stored = rows(&leader, db.table()).await;
    assert_eq!(stored[&id].0 as u64, *latest_version);
    assert_eq!(&stored[&id].1, latest_data);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    drop_table(&leader, &db).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Graceful shutdown with 1,000 saves pending

#[tokio::test]
async fn shutdown_drains_a_thousand_pending_saves() {
    let Some(rig) = rig_or_skip("shutdown_drains_a_thousand_pending_saves") else {
        return;
    };
    let leader = pool(rig.leader_url()).await;
    let db = table(&leader, "shutdown").await;
    let gated = Gated::new(db.clone());
    let store = WriteBehindStore::builder(MemoryCache::new(), gated.clone())
        .build()
        .unwrap();
    // The writer's first batch is stuck: everything after it waits in the outbox.
    let release = gated.hold_next_write();
    let sessions: Vec<SessionRecord> = (0..1000).map(|i| session(json!({ "n": i }))).collect();
    for record in &sessions {
        store.save(record).await.unwrap();
    }
    assert_eq!(store.stats().pending, 1000);
    let shutdown = tokio::spawn({
        let store = store.clone();
        async move { store.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the outbox");
    assert!(matches!(
        store.save(&session(json!({}))).await,
        Err(SessionError::ShutDown)
    ));
    drop(release);
    shutdown.await.unwrap().unwrap();
    let stored = rows(&leader, db.table()).await;
    assert_eq!(stored.len(), 1000);
    for record in &sessions {
        assert_eq!(stored[&record.id.to_string()].1, record.data);
    }
    drop_table(&leader, &db).await;
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile input

#[tokio::test]
async fn hostile_input_gets_typed_errors_or_a_fresh_session() {
    let Some(rig) = rig_or_skip("hostile_input_gets_typed_errors_or_a_fresh_session") else {
        return;
    };
    let leader = pool(rig.leader_url()).await;
    let db = Gated::new(table(&leader, "hostile").await);
    let cache = switchable(MemoryCache::new());
    let store = WriteBehindStore::builder(cache.clone(), db.clone())
        .build()
        .unwrap();
    let bystander = session(json!({ "user": "bystander" }));
    store.save(&bystander).await.unwrap();

    // Garbage, truncated and forged ids.
    let real = SessionId::generate().to_string();
    let (cache_calls, loads) = (cache.calls(), db.loads.load(Ordering::SeqCst));
    let long = "A".repeat(100_000);
    for garbage in [
        "",
        "null",
        &real[..21],
        &real[1..],
        &format!("{real}="),
        "'; DROP TABLE distributed_sessions; --",
        "..%2F..%2Fetc%2Fpasswd",
        "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        "ÅÅÅÅÅÅÅÅÅÅÅ",
        &long,
    ] {
        assert!(matches!(
            store.load_str(garbage).await,
            Err(SessionError::InvalidId)
        ));
    }
    assert_eq!(cache.calls(), cache_calls, "no cache call");
    assert_eq!(db.loads.load(Ordering::SeqCst), loads, "no database call");
    // Forged, well-formed: a clean miss (so the user gets a fresh session).
    assert!(store.load_str(&real).await.unwrap().is_none());

    // A 1 MB session: refused with a typed error by default...
    let mut big = session(json!({}));
    big.data.insert("blob".into(), json!("x".repeat(1 << 20)));
    let refused = store.save(&big).await;
    assert!(
        matches!(refused, Err(SessionError::TooLarge { .. })),
        "{refused:?}"
    );
    // ...and stored intact where the limit allows it.
    let roomy = WriteBehindStore::builder(cache.clone(), db.clone())
        .max_session_bytes(2 << 20)
        .build()
        .unwrap();
    roomy.save(&big).await.unwrap();
    roomy.flush().await.unwrap();

    // Keys with control characters, quotes and SQL.
    let mut odd = session(json!({}));
    for (i, key) in [
        "\0",
        "\n\r\t",
        "\u{1b}[2J",
        "\u{7f}\u{80}",
        "\u{feff}bom",
        "'; DROP TABLE x; --",
        "\"quoted\"",
        "😀",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        odd.data.insert(key.into(), json!(i));
    }
    odd.data.insert("nul value".into(), json!("a\0b"));
    store.save(&odd).await.unwrap();
    store.flush().await.unwrap();

    // Read back from the database, as a server with an empty cache would.
    cache.set_down(true);
    let fresh = WriteBehindStore::builder(cache.clone(), db.clone())
        .build()
        .unwrap();
    assert_eq!(fresh.load(&odd.id).await.unwrap().unwrap().data, odd.data);
    assert_eq!(fresh.load(&big.id).await.unwrap().unwrap().data, big.data);
    assert_eq!(
        fresh.load(&bystander.id).await.unwrap().unwrap().data,
        bystander.data,
        "nothing else affected"
    );
    cache.set_down(false);

    // Through the tower stack: garbage cookies get a fresh session, never an error.
    use distributed_session::SessionScopeLayer;
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    use tower_sessions::{Session, SessionManagerLayer};
    let app = ServiceBuilder::new()
        .layer(SessionScopeLayer::new())
        .layer(SessionManagerLayer::new(store.clone()).with_secure(false))
        .service(service_fn(|req: http::Request<String>| async move {
            let session = req.extensions().get::<Session>().cloned().unwrap();
            session.insert("seen", true).await.unwrap();
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
    for cookie in ["garbage", &real[..21], &real, "%00%0a", &"B".repeat(4096)] {
        let req = http::Request::builder()
            .header(http::header::COOKIE, format!("id={cookie}"))
            .body(String::new())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let set = res.headers()[http::header::SET_COOKIE].to_str().unwrap();
        let fresh_id = set.split(';').next().unwrap().strip_prefix("id=").unwrap();
        assert_ne!(fresh_id, cookie);
        SessionId::parse(fresh_id).unwrap();
    }

    for s in [&store, &roomy, &fresh] {
        s.shutdown().await.unwrap();
        assert_eq!(s.stats().dead, 0);
    }
    drop_table(&leader, &db.inner).await;
}
