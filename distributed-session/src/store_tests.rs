//! Unit tests of the engine, with an in-memory cache and database that can fail on demand.

use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use distributed_core::{
    Config, DistributedRouter, MemoryCache, Reason, Router, Scope, SessionCachedRouter, with_scope,
};
use serde_json::json;
use tokio::sync::oneshot;

use super::*;
use crate::{MemoryDatabase, SessionData, StoredSession};

/// A cache that can be switched off and counts its calls.
type FlakyCache = distributed_core::SwitchableCache;

/// A database that can hold one write at a gate, be slow, or reject "poison" rows.
#[derive(Default, Clone)]
struct TestDb {
    inner: MemoryDatabase,
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    /// Signalled when a write stops at the gate.
    held: Arc<tokio::sync::Notify>,
    delay: Arc<Mutex<Duration>>,
    poison: Arc<AtomicBool>,
    /// How many of the next writes panic (a bug in a database adapter, say).
    panicking_writes: Arc<AtomicU64>,
    /// How many of the next cleanups panic.
    panicking_cleanups: Arc<AtomicU64>,
    /// Cleanups run so far.
    cleanups: Arc<AtomicU64>,
}

/// Takes one from `counter` unless it is zero; whether it did.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl TestDb {
    /// The next write waits until the returned sender is used or dropped.
    fn hold_next_write(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *lock(&self.gate) = Some(rx);
        tx
    }
    fn set_delay(&self, delay: Duration) {
        *lock(&self.delay) = delay;
    }
}

#[async_trait]
impl SessionDatabase for TestDb {
    async fn migrate(&self) -> Result<(), SessionError> {
        self.inner.migrate().await
    }
    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        self.inner.load(id).await
    }
    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        if take_one(&self.panicking_writes) {
            panic!("a bug in the database adapter");
        }
        let gate = lock(&self.gate).take();
        if let Some(gate) = gate {
            self.held.notify_one();
            let _ = gate.await;
        }
        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let poisoned = |row: &SessionRow<'_>| {
            row.data
                .is_some_and(|d| d.windows(6).any(|w| w == b"poison"))
        };
        if self.poison.load(Ordering::SeqCst) && rows.iter().any(poisoned) {
            return Err(SessionError::DatabaseRejected("poison row".into()));
        }
        self.inner.write(rows).await
    }
    async fn delete_expired(&self) -> Result<u64, SessionError> {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.panicking_cleanups) {
            panic!("a bug in the cleanup query");
        }
        self.inner.delete_expired().await
    }
}

type Store = WriteBehindStore<FlakyCache, TestDb>;

fn builder(cache: &FlakyCache, db: &TestDb) -> WriteBehindBuilder<FlakyCache, TestDb> {
    WriteBehindStore::builder(cache.clone(), db.clone())
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .backpressure_timeout(Duration::from_millis(50))
}

fn store() -> (Store, FlakyCache, TestDb) {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    (builder(&cache, &db).build().unwrap(), cache, db)
}

fn session(tag: &str) -> SessionRecord {
    let mut record = SessionRecord::new(Duration::from_secs(600));
    record.data.insert("tag".into(), json!(tag));
    record
}

fn tag_of(record: &SessionRecord) -> &str {
    record.data["tag"].as_str().unwrap_or_default()
}

fn db_tag(db: &TestDb, id: &SessionId) -> Option<String> {
    let row = db.inner.row(id)?;
    let data: SessionData = serde_json::from_slice(&row.data?).unwrap();
    Some(data["tag"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn save_answers_from_the_cache_and_the_database_follows() {
    let (store, cache, db) = store();
    let record = session("a");
    let version = store.save(&record).await.unwrap();
    assert_eq!(tag_of(&store.load(&record.id).await.unwrap().unwrap()), "a");
    store.flush().await.unwrap();
    assert_eq!(db.inner.row(&record.id).unwrap().version, version);
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("a"));

    // Another app server (its own outbox, the same cache) finds it in the cache...
    let other = builder(&cache, &db).build().unwrap();
    let loads = db.inner.loads();
    assert!(other.load(&record.id).await.unwrap().is_some());
    assert_eq!(db.inner.loads(), loads, "served by the cache");
    // ...and in the database once the cache lost it, refilling the cache.
    cache
        .inner()
        .delete(&format!("distributed:session:{}", record.id))
        .await
        .unwrap();
    assert!(other.load(&record.id).await.unwrap().is_some());
    assert_eq!(db.inner.loads(), loads + 1);
    assert!(other.load(&record.id).await.unwrap().is_some());
    assert_eq!(db.inner.loads(), loads + 1, "refilled");
}

#[tokio::test]
async fn a_newer_save_on_another_server_beats_this_servers_pending_change() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let (a, b) = (
        builder(&cache, &db).build().unwrap(),
        builder(&cache, &db).build().unwrap(),
    );
    db.inner.set_down(true);
    let mut record = session("a's");
    a.save(&record).await.unwrap();
    record.data.insert("tag".into(), json!("b's, newer"));
    b.save(&record).await.unwrap();
    // a still holds its own older change, unwritten; the cache has b's.
    assert_eq!(a.stats().pending, 1);
    assert_eq!(
        tag_of(&a.load(&record.id).await.unwrap().unwrap()),
        "b's, newer"
    );
    // With the cache gone too, a's pending change is still an answer.
    cache.set_down(true);
    assert_eq!(tag_of(&a.load(&record.id).await.unwrap().unwrap()), "a's");
    cache.set_down(false);
    db.inner.set_down(false);
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("b's, newer"));
}

#[tokio::test]
async fn repeated_saves_coalesce_into_the_latest() {
    let (store, _, db) = store();
    let mut record = session("0");
    let release = db.hold_next_write();
    // The first save is taken by the writer and held; the rest pile up behind it.
    store.save(&record).await.unwrap();
    tokio::task::yield_now().await;
    let mut last = 0;
    for i in 1..=100 {
        record.data.insert("tag".into(), json!(i.to_string()));
        last = store.save(&record).await.unwrap();
    }
    assert_eq!(store.stats().pending, 1);
    drop(release);
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("100"));
    assert_eq!(db.inner.row(&record.id).unwrap().version, last);
    assert!(
        db.inner.writes() <= 3,
        "100 saves, {} writes",
        db.inner.writes()
    );
}

#[tokio::test]
async fn batches_many_sessions_into_few_writes() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db).batch_size(100).build().unwrap();
    let release = db.hold_next_write();
    let records: Vec<_> = (0..300).map(|i| session(&i.to_string())).collect();
    for r in &records {
        store.save(r).await.unwrap();
    }
    drop(release);
    store.flush().await.unwrap();
    for r in &records {
        assert_eq!(db_tag(&db, &r.id).as_deref(), Some(tag_of(r)));
    }
    assert!(db.inner.writes() <= 5, "{} writes", db.inner.writes());
}

#[tokio::test]
async fn retries_while_the_database_is_down_and_flush_waits() {
    let (store, _, db) = store();
    db.inner.set_down(true);
    let records: Vec<_> = (0..50).map(|i| session(&i.to_string())).collect();
    for r in &records {
        store.save(r).await.unwrap();
    }
    let flush = tokio::spawn({
        let store = store.clone();
        async move { store.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!flush.is_finished());
    assert!(store.stats().failed_attempts >= 2, "{:?}", store.stats());
    db.inner.set_down(false);
    flush.await.unwrap().unwrap();
    for r in &records {
        assert_eq!(db_tag(&db, &r.id).as_deref(), Some(tag_of(r)));
    }
    assert_eq!(store.stats().dead, 0);
}

#[tokio::test]
async fn gives_up_after_the_bound_and_says_so() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let reported = Arc::new(Mutex::new(Vec::new()));
    let store = builder(&cache, &db)
        .give_up_after(Duration::from_millis(50))
        .on_dead_write({
            let reported = reported.clone();
            move |dead| lock(&reported).push((dead.id, dead.version, dead.error.label()))
        })
        .build()
        .unwrap();
    db.inner.set_down(true);
    let record = session("doomed");
    let version = store.save(&record).await.unwrap();
    let flushed = store.flush().await;
    assert!(
        matches!(flushed, Err(SessionError::DeadWrites { count: 1 })),
        "{flushed:?}"
    );
    assert_eq!(
        *lock(&reported),
        vec![(record.id, version, "database_unavailable")]
    );
    assert_eq!(store.stats().dead, 1);
    assert_eq!(store.stats().pending, 0);
}

#[tokio::test]
async fn a_panicking_hook_does_not_stop_the_writer() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .give_up_after(Duration::from_millis(20))
        .on_dead_write(|_| panic!("hook bug"))
        .build()
        .unwrap();
    db.inner.set_down(true);
    store.save(&session("x")).await.unwrap();
    assert!(store.flush().await.is_err());
    db.inner.set_down(false);
    let record = session("after");
    store.save(&record).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("after"));
}

#[tokio::test]
async fn a_rejected_row_does_not_sink_its_batch() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .give_up_after(Duration::from_millis(50))
        .build()
        .unwrap();
    db.poison.store(true, Ordering::SeqCst);
    let release = db.hold_next_write();
    store.save(&session("first")).await.unwrap();
    tokio::task::yield_now().await;
    let good: Vec<_> = (0..10).map(|i| session(&i.to_string())).collect();
    let bad = session("poison");
    store.save(&bad).await.unwrap();
    for r in &good {
        store.save(r).await.unwrap();
    }
    drop(release);
    assert!(matches!(
        store.flush().await,
        Err(SessionError::DeadWrites { count: 1 })
    ));
    for r in &good {
        assert_eq!(db_tag(&db, &r.id).as_deref(), Some(tag_of(r)));
    }
    assert!(db.inner.row(&bad.id).is_none());
}

#[tokio::test]
async fn a_full_outbox_waits_for_room() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .capacity(1)
        .backpressure_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    db.set_delay(Duration::from_millis(200));
    let (a, b) = (session("a"), session("b"));
    store.save(&a).await.unwrap();
    store.save(&b).await.unwrap();
    let stats = store.stats();
    assert_eq!(stats.backpressure_waits, 1);
    assert_eq!(stats.written_through, 0, "room came within the timeout");
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &b.id).as_deref(), Some("b"));
}

#[tokio::test]
async fn a_full_outbox_writes_through_after_the_timeout() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .capacity(1)
        .backpressure_timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    let release = db.hold_next_write();
    let (a, b) = (session("a"), session("b"));
    store.save(&a).await.unwrap();
    db.held.notified().await;
    store.save(&b).await.unwrap();
    assert_eq!(store.stats().written_through, 1);
    assert_eq!(db_tag(&db, &b.id).as_deref(), Some("b"), "already written");
    drop(release);
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &a.id).as_deref(), Some("a"));
}

#[tokio::test]
async fn a_full_outbox_with_the_database_down_refuses_the_save_openly() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .capacity(1)
        .backpressure_timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    db.inner.set_down(true);
    store.save(&session("a")).await.unwrap();
    let b = session("b");
    let refused = store.save(&b).await;
    assert!(
        matches!(refused, Err(SessionError::Overloaded(_))),
        "{refused:?}"
    );
    assert!(refused.unwrap_err().is_transient());
    // The cache does not claim a save that was refused.
    assert!(store.load(&b.id).await.is_err() || store.load(&b.id).await.unwrap().is_none());
}

#[tokio::test]
async fn cache_down_writes_through_and_reads_the_database() {
    let (store, cache, db) = store();
    let mut record = session("v1");
    store.save(&record).await.unwrap();
    store.flush().await.unwrap();
    cache.set_down(true);
    record.data.insert("tag".into(), json!("v2"));
    store.save(&record).await.unwrap();
    assert_eq!(store.stats().written_through, 1);
    assert_eq!(
        db_tag(&db, &record.id).as_deref(),
        Some("v2"),
        "written through"
    );
    assert_eq!(
        tag_of(&store.load(&record.id).await.unwrap().unwrap()),
        "v2"
    );
    // Back up, the cache still holds v1 (as after a network partition): never served,
    // whether the engine asks the cache again yet or not.
    cache.set_down(false);
    let key = format!("distributed:session:{}", record.id);
    assert!(
        cache.inner().get(&key).await.unwrap().is_some(),
        "v1 is there"
    );
    for _ in 0..5 {
        assert_eq!(
            tag_of(&store.load(&record.id).await.unwrap().unwrap()),
            "v2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The repair task deletes the stale entry within a round; loads refill it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        tag_of(&store.load(&record.id).await.unwrap().unwrap()),
        "v2"
    );
    let cached = cache.inner().get(&key).await.unwrap().unwrap();
    let (_, encoded) = parse_cache_value(&cached).unwrap();
    assert_eq!(tag_of(&encoded.decode(record.id).unwrap()), "v2");
}

#[tokio::test]
async fn an_unreachable_cache_is_left_alone_for_a_while() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .cache_retry_after(Some(Duration::from_secs(60)))
        .build()
        .unwrap();
    cache.set_down(true);
    let record = session("x");
    store.save(&record).await.unwrap();
    let calls = cache.calls();
    cache.set_down(false);
    for _ in 0..10 {
        store.save(&record).await.unwrap();
        assert!(store.load(&record.id).await.unwrap().is_some());
    }
    assert_eq!(cache.calls(), calls, "not asked");
    assert_eq!(store.stats().written_through, 11);
}

#[tokio::test]
async fn cache_and_database_down_queues_the_save() {
    let (store, cache, db) = store();
    cache.set_down(true);
    db.inner.set_down(true);
    let record = session("both down");
    store.save(&record).await.unwrap();
    assert_eq!(
        tag_of(&store.load(&record.id).await.unwrap().unwrap()),
        "both down"
    );
    db.inner.set_down(false);
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("both down"));
}

#[tokio::test]
async fn delete_beats_a_write_in_flight_and_a_replayed_cookie_finds_nothing() {
    let (store, cache, db) = store();
    let record = session("logged in");
    let release = db.hold_next_write();
    store.save(&record).await.unwrap();
    // The writer took it: it is now in flight, held at the gate.
    db.held.notified().await;
    store.delete(&record.id).await.unwrap();
    // The in-flight write lands after the tombstone and loses.
    drop(release);
    store.flush().await.unwrap();
    let row = db.inner.row(&record.id).unwrap();
    assert!(row.data.is_none(), "tombstone kept");
    assert!(store.load(&record.id).await.unwrap().is_none());
    // Replaying the old cookie on another server: cache and database both say no.
    let other = builder(&cache, &db).build().unwrap();
    assert!(other.load(&record.id).await.unwrap().is_none());
    // A request racing the logout cannot save it back.
    assert!(matches!(
        store.save(&record).await,
        Err(SessionError::Deleted)
    ));
    // Nor can another server: the tombstone is final.
    other.save(&record).await.unwrap();
    other.flush().await.unwrap();
    assert!(db.inner.row(&record.id).unwrap().data.is_none());
}

#[tokio::test]
async fn delete_cancels_a_pending_write() {
    let (store, _, db) = store();
    db.inner.set_down(true);
    let record = session("pending");
    store.save(&record).await.unwrap();
    let release = db.hold_next_write();
    db.inner.set_down(false);
    // The writer's retry is held at the gate; delete goes around it.
    db.held.notified().await;
    store.delete(&record.id).await.unwrap();
    drop(release);
    store.flush().await.unwrap();
    assert!(db.inner.row(&record.id).unwrap().data.is_none());
    assert!(store.load(&record.id).await.unwrap().is_none());
}

#[tokio::test]
async fn delete_with_the_database_down_keeps_the_tombstone_pending() {
    let (store, _, db) = store();
    let record = session("x");
    store.save(&record).await.unwrap();
    store.flush().await.unwrap();
    db.inner.set_down(true);
    store.delete(&record.id).await.unwrap();
    assert!(store.load(&record.id).await.unwrap().is_none());
    db.inner.set_down(false);
    store.flush().await.unwrap();
    assert!(db.inner.row(&record.id).unwrap().data.is_none());
}

#[tokio::test]
async fn cycle_id_moves_the_data_deletes_the_old_id_and_carries_the_pin() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let config = Config::builder()
        .leader("l", "postgres://l/app")
        .follower("f", "postgres://f/app")
        .lag_window(Duration::from_secs(5))
        .build()
        .unwrap();
    let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
    let router = Arc::new(DistributedRouter::new(config, pins));
    let store = builder(&cache, &db)
        .carry_pins(router.clone())
        .build()
        .unwrap();
    let anonymous = session("cart");
    store.save(&anonymous).await.unwrap();
    // The login request writes (say, last_login) and cycles the id.
    let scope = Scope::new(anonymous.id.to_string());
    let logged_in = with_scope(scope.clone(), async {
        router
            .record_write(Some(&scope), Some("users"), None)
            .await
            .unwrap();
        store.cycle_id(&anonymous).await.unwrap()
    })
    .await;
    assert_ne!(logged_in.id, anonymous.id);
    assert_eq!(
        tag_of(&store.load(&logged_in.id).await.unwrap().unwrap()),
        "cart"
    );
    assert!(store.load(&anonymous.id).await.unwrap().is_none());
    // The next request, under the new id, reads the leader.
    let next = Scope::new(logged_in.id.to_string());
    assert_eq!(
        router.route_read(Some(&next), None).await.reason,
        Reason::RecentWrite
    );
    store.flush().await.unwrap();
    assert!(db.inner.row(&anonymous.id).unwrap().data.is_none());
    assert_eq!(db_tag(&db, &logged_in.id).as_deref(), Some("cart"));
}

#[tokio::test]
async fn malformed_ids_are_rejected_before_any_io() {
    let (store, cache, db) = store();
    let calls = cache.calls();
    for text in [
        "",
        "x",
        "AAAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAA!!",
        "%00",
    ] {
        assert!(matches!(
            store.load_str(text).await,
            Err(SessionError::InvalidId)
        ));
    }
    assert_eq!(cache.calls(), calls);
    assert_eq!(db.inner.loads(), 0);
    // A well-formed id nobody issued: a clean miss.
    let forged = SessionId::generate().to_string();
    assert!(store.load_str(&forged).await.unwrap().is_none());
}

#[tokio::test]
async fn expired_sessions_load_as_none_and_are_cleaned_up() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .cleanup_interval(Some(Duration::from_millis(50)))
        .build()
        .unwrap();
    let mut record = session("short");
    record.expires_at = SystemTime::now() + Duration::from_millis(30);
    store.save(&record).await.unwrap();
    store.flush().await.unwrap();
    assert!(db.inner.row(&record.id).is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.load(&record.id).await.unwrap().is_none());
    assert!(
        db.inner.row(&record.id).is_none(),
        "removed by the cleanup task"
    );
}

#[tokio::test]
async fn shutdown_drains_and_then_refuses() {
    let (store, _, db) = store();
    db.set_delay(Duration::from_millis(20));
    let records: Vec<_> = (0..200).map(|i| session(&i.to_string())).collect();
    for r in &records {
        store.save(r).await.unwrap();
    }
    assert!(store.stats().pending > 0);
    store.shutdown().await.unwrap();
    for r in &records {
        assert_eq!(db_tag(&db, &r.id).as_deref(), Some(tag_of(r)));
    }
    assert!(matches!(
        store.save(&session("late")).await,
        Err(SessionError::ShutDown)
    ));
}

#[tokio::test]
async fn dropping_the_last_handle_still_drains() {
    let (store, _, db) = store();
    db.set_delay(Duration::from_millis(20));
    let record = session("orphan");
    store.save(&record).await.unwrap();
    drop(store);
    for _ in 0..100 {
        if db.inner.row(&record.id).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the orphaned save never reached the database");
}

#[tokio::test]
async fn too_large_sessions_are_refused_and_nothing_else_is_affected() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    let store = builder(&cache, &db)
        .max_session_bytes(1000)
        .build()
        .unwrap();
    let bystander = session("bystander");
    store.save(&bystander).await.unwrap();
    let mut big = session("big");
    big.data.insert("blob".into(), json!("x".repeat(2000)));
    assert!(matches!(
        store.save(&big).await,
        Err(SessionError::TooLarge { limit: 1000, .. })
    ));
    assert!(store.load(&big.id).await.unwrap().is_none());
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &bystander.id).as_deref(), Some("bystander"));
}

#[test]
fn backoff_grows_with_jitter_and_is_capped() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new())
            .retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
            .build()
            .unwrap()
    });
    let engine = &store.engine;
    for (failures, full) in [
        (1, 100),
        (2, 200),
        (3, 400),
        (5, 1600),
        (6, 2000),
        (60, 2000),
    ] {
        let full = Duration::from_millis(full);
        let waits: Vec<Duration> = (0..200).map(|_| engine.backoff(failures)).collect();
        assert!(
            waits.iter().all(|w| *w >= full / 2 && *w <= full),
            "{failures}"
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
    }
}

#[tokio::test]
async fn build_validates_its_settings() {
    let build = |b: WriteBehindBuilder<MemoryCache, MemoryDatabase>| b.build().map(|_| ());
    let b = || WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new());
    assert!(matches!(
        build(b().capacity(0)),
        Err(SessionError::Config(_))
    ));
    assert!(matches!(
        build(b().batch_size(0)),
        Err(SessionError::Config(_))
    ));
    assert!(matches!(
        build(b().retry_backoff(Duration::ZERO, Duration::from_secs(1))),
        Err(SessionError::Config(_))
    ));
}

#[tokio::test]
async fn a_panicking_writer_is_restarted_and_retries_its_batch() {
    let (store, _cache, db) = store();
    db.panicking_writes.store(2, Ordering::SeqCst);
    let record = session("survives");
    store.save(&record).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), store.flush())
        .await
        .expect("the writer came back and wrote the batch it had taken")
        .unwrap();
    assert_eq!(db_tag(&db, &record.id).as_deref(), Some("survives"));
    // And it goes on writing.
    let later = session("later");
    store.save(&later).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(db_tag(&db, &later.id).as_deref(), Some("later"));
}

#[tokio::test]
async fn a_panicking_cleanup_is_restarted() {
    let (cache, db) = (FlakyCache::default(), TestDb::default());
    db.panicking_cleanups.store(1, Ordering::SeqCst);
    let store = builder(&cache, &db)
        .cleanup_interval(Some(Duration::from_millis(10)))
        .build()
        .unwrap();
    let ran = async {
        while db.cleanups.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ran)
        .await
        .expect("cleanup went on after its panic");
    store.shutdown().await.unwrap();
}

/// Every duration setting of the builder, through zero, a nanosecond, the longest accepted,
/// one past it and `Duration::MAX`: each builds a store that works (saves, loads, deletes,
/// flushes, cleans up) or is a typed [`SessionError::Config`] from `build()`.
#[tokio::test]
async fn every_duration_setting_works_or_is_refused_at_zero_and_at_max() {
    type B = WriteBehindBuilder<FlakyCache, TestDb>;
    type Set = fn(B, Duration) -> B;
    let settings: [(&str, Set, bool); 10] = [
        // (name, setter, whether zero is refused)
        ("backpressure_timeout", B::backpressure_timeout, false),
        (
            "retry_backoff initial",
            |b, d| b.retry_backoff(d, MAX_DURATION_SETTING),
            true,
        ),
        (
            "retry_backoff max",
            |b, d| b.retry_backoff(Duration::from_nanos(1), d),
            true,
        ),
        ("give_up_after", B::give_up_after, false),
        ("cache_timeout", B::cache_timeout, true),
        ("db_timeout", B::db_timeout, true),
        (
            "cache_retry_after",
            |b, d| b.cache_retry_after(Some(d)),
            false,
        ),
        ("cache_ttl", B::cache_ttl, false),
        ("tombstone_ttl", B::tombstone_ttl, false),
        ("cleanup_interval", |b, d| b.cleanup_interval(Some(d)), true),
    ];
    let values = [
        Duration::ZERO,
        Duration::from_nanos(1),
        MAX_DURATION_SETTING,
        MAX_DURATION_SETTING + Duration::from_nanos(1),
        Duration::MAX,
    ];
    for (name, set, zero_refused) in settings {
        for value in values {
            let (cache, db) = (FlakyCache::default(), TestDb::default());
            let built = set(WriteBehindStore::builder(cache.clone(), db.clone()), value).build();
            let refused = (value.is_zero() && zero_refused) || value > MAX_DURATION_SETTING;
            if refused {
                assert!(
                    matches!(built, Err(SessionError::Config(_))),
                    "{name} = {value:?} built"
                );
                continue;
            }
            let store = match built {
                Ok(store) => store,
                Err(e) => panic!("{name} = {value:?} refused: {e:?}"),
            };
            let exercise = async {
                let record = session("x");
                store.save(&record).await.unwrap();
                assert!(store.load(&record.id).await.unwrap().is_some());
                let gone = session("gone");
                store.save(&gone).await.unwrap();
                store.delete(&gone.id).await.unwrap();
                // The cache fails once: the paths that pause or distrust it run too.
                cache.set_down(true);
                let other = session("y");
                let _ = store.save(&other).await;
                cache.set_down(false);
                store.flush().await.unwrap();
                assert_eq!(db_tag(&db, &record.id).as_deref(), Some("x"), "{name}");
                store.delete_expired().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                store.shutdown().await.unwrap();
            };
            tokio::time::timeout(Duration::from_secs(10), exercise)
                .await
                .unwrap_or_else(|_| panic!("{name} = {value:?}: the store stopped working"));
        }
    }
}
