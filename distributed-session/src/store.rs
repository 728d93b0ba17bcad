//! The write-behind engine.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use distributed_core::{Cache, CacheError, ScopeKey, current_scope};
use rand::Rng as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::outbox::{Change, Dead, Item, Outbox};
use crate::record::{Encoded, cache_value, parse_cache_value};
use crate::{PinCarrier, SessionDatabase, SessionError, SessionId, SessionRecord, SessionRow};

/// How many sessions may be remembered as "the cache may hold an older value" before the
/// engine stops trusting the cache altogether for one cache TTL.
const STALE_CAP: usize = 100_000;
/// How many stale cache entries one repair round deletes.
const REPAIR_CHUNK: usize = 1000;
/// Per-session locks, striped: saves, deletes and cache refills of one session are ordered.
const STRIPES: usize = 256;

/// The longest any duration setting of [`WriteBehindBuilder`] may be: a year. Longer is a unit
/// mistaken, and within it no deadline the engine computes can overflow;
/// [`build`](WriteBehindBuilder::build) refuses more with [`SessionError::Config`].
pub const MAX_DURATION_SETTING: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A write given up after the retry bound, as handed to the
/// [`on_dead_write`](WriteBehindBuilder::on_dead_write) hook.
///
/// The session is still in the cache (until its cache TTL) but not in the database.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadWrite {
    /// The session (its `Debug` is redacted; do not log its `Display`).
    pub id: SessionId,
    /// The version that was not written.
    pub version: u64,
    /// How many times it was tried.
    pub attempts: u32,
    /// The last error.
    pub error: Arc<SessionError>,
}

/// What the engine has done since it started, for tests and dashboards (the same numbers go
/// to the `metrics` facade).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Sessions with a change not yet in the database.
    pub pending: usize,
    /// Saves accepted into the outbox.
    pub queued: u64,
    /// Saves written straight to the database (cache down, or outbox full).
    pub written_through: u64,
    /// Batches the writer wrote.
    pub batches: u64,
    /// Rows in those batches.
    pub rows: u64,
    /// Failed write attempts of the writer.
    pub failed_attempts: u64,
    /// Changes given up after the retry bound.
    pub dead: u64,
    /// Saves that found the outbox full and waited.
    pub backpressure_waits: u64,
    /// Cache calls that failed or timed out.
    pub cache_errors: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    written_through: AtomicU64,
    batches: AtomicU64,
    rows: AtomicU64,
    failed_attempts: AtomicU64,
    dead: AtomicU64,
    backpressure_waits: AtomicU64,
    cache_errors: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

type DeadWriteHook = Arc<dyn Fn(&DeadWrite) + Send + Sync>;

#[derive(Debug, Clone)]
struct Settings {
    capacity: usize,
    batch_size: usize,
    backpressure_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    give_up_after: Duration,
    cache_timeout: Duration,
    db_timeout: Duration,
    cache_ttl: Duration,
    cache_prefix: String,
    max_session_bytes: usize,
    tombstone_ttl: Duration,
    cleanup_interval: Option<Duration>,
    repair_interval: Duration,
    delete_memory: Duration,
    cache_retry_after: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            batch_size: 256,
            backpressure_timeout: Duration::from_millis(250),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(300),
            cache_timeout: Duration::from_millis(250),
            db_timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(3600),
            cache_prefix: "distributed:session:".to_owned(),
            max_session_bytes: 512 * 1024,
            tombstone_ttl: Duration::from_secs(3600),
            cleanup_interval: Some(Duration::from_secs(300)),
            repair_interval: Duration::from_secs(1),
            delete_memory: Duration::from_secs(600),
            cache_retry_after: None,
        }
    }
}

impl Settings {
    /// Every setting within its range: what [`WriteBehindBuilder::build`] checks.
    fn validate(&self) -> Result<(), SessionError> {
        if self.capacity == 0 || self.batch_size == 0 {
            return Err(SessionError::Config(
                "capacity and batch size must be at least 1",
            ));
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(SessionError::Config(
                "retry backoff must start above zero and not exceed its maximum",
            ));
        }
        if self.cache_timeout.is_zero() || self.db_timeout.is_zero() {
            return Err(SessionError::Config(
                "the cache and database timeouts must be above zero",
            ));
        }
        if self.cleanup_interval.is_some_and(|every| every.is_zero()) {
            return Err(SessionError::Config(
                "the cleanup interval must be above zero (None turns cleanup off)",
            ));
        }
        let longest = [
            self.backpressure_timeout,
            self.retry_max,
            self.give_up_after,
            self.cache_timeout,
            self.db_timeout,
            self.cache_ttl,
            self.tombstone_ttl,
            self.cleanup_interval.unwrap_or_default(),
            self.cache_retry_after.unwrap_or_default(),
        ]
        .into_iter()
        .max()
        .unwrap_or_default();
        if longest > MAX_DURATION_SETTING {
            return Err(SessionError::Config(
                "a duration setting is longer than a year (MAX_DURATION_SETTING); was a unit mistaken?",
            ));
        }
        Ok(())
    }
}

/// Configures and starts a [`WriteBehindStore`]; from [`WriteBehindStore::builder`].
pub struct WriteBehindBuilder<C, D> {
    cache: C,
    db: D,
    settings: Settings,
    hook: Option<DeadWriteHook>,
    pins: Option<Arc<dyn PinCarrier>>,
}

impl<C, D> fmt::Debug for WriteBehindBuilder<C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehindBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<C: Cache + 'static, D: SessionDatabase> WriteBehindBuilder<C, D> {
    /// How many sessions may have a change waiting for the database (default 10,000). A save
    /// of a session already waiting needs no room; beyond that, saves wait
    /// [`backpressure_timeout`](Self::backpressure_timeout) for room, then write through.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.settings.capacity = capacity;
        self
    }

    /// How many sessions one database statement writes (default 256).
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.settings.batch_size = batch_size;
        self
    }

    /// How long a save waits for room in a full outbox before writing through (default 250 ms;
    /// zero writes through at once).
    #[must_use]
    pub fn backpressure_timeout(mut self, timeout: Duration) -> Self {
        self.settings.backpressure_timeout = timeout;
        self
    }

    /// The writer's backoff while the database fails: `initial`, doubling up to `max`, each
    /// wait drawn between half and all of that (default 50 ms to 5 s). `initial` must be above
    /// zero and `max` at least `initial`.
    #[must_use]
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.retry_initial = initial;
        self.settings.retry_max = max;
        self
    }

    /// How long a change may wait for the database, failing, before it is given up and
    /// reported as dead (default 5 minutes; zero gives a change up at its first failure).
    #[must_use]
    pub fn give_up_after(mut self, bound: Duration) -> Self {
        self.settings.give_up_after = bound;
        self
    }

    /// The timeout of each cache call (default 250 ms; above zero); past it the cache counts as
    /// down.
    #[must_use]
    pub fn cache_timeout(mut self, timeout: Duration) -> Self {
        self.settings.cache_timeout = timeout;
        self
    }

    /// The timeout of each database call (default 5 s; above zero).
    #[must_use]
    pub fn db_timeout(mut self, timeout: Duration) -> Self {
        self.settings.db_timeout = timeout;
        self
    }

    /// After the cache is found unreachable, how long this server does not ask it at all
    /// (default: it always asks). Saves write through and loads read the database meanwhile,
    /// instead of each paying the cache's timeout.
    ///
    /// Off by default because it trades consistency between app servers for latency during
    /// an outage: the pauses of two servers end at different times, and while one writes
    /// around a cache that another reads again, the other can read a session older than the
    /// first one's last save. With a single app server (or a cache that fails fast) nothing
    /// is lost by leaving it off.
    #[must_use]
    pub fn cache_retry_after(mut self, pause: Option<Duration>) -> Self {
        self.settings.cache_retry_after = pause;
        self
    }

    /// The longest a session stays in the cache (default 1 hour; never past its expiry, and at
    /// least a second).
    #[must_use]
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.settings.cache_ttl = ttl;
        self
    }

    /// Prefixes every cache key (default `"distributed:session:"`).
    #[must_use]
    pub fn cache_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.cache_prefix = prefix.into();
        self
    }

    /// The largest session, as encoded JSON, a save accepts (default 512 KiB); larger ones
    /// fail with [`SessionError::TooLarge`].
    #[must_use]
    pub fn max_session_bytes(mut self, limit: usize) -> Self {
        self.settings.max_session_bytes = limit;
        self
    }

    /// How long a deleted session's tombstone stays in the database (default 1 hour). It
    /// must outlast any write still being retried, so it is at least
    /// [`give_up_after`](Self::give_up_after).
    #[must_use]
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.settings.tombstone_ttl = ttl;
        self
    }

    /// How often expired sessions are removed from the database (default every 5 minutes;
    /// `None` turns the task off; `Some(Duration::ZERO)` is refused by
    /// [`build`](Self::build)).
    #[must_use]
    pub fn cleanup_interval(mut self, interval: Option<Duration>) -> Self {
        self.settings.cleanup_interval = interval;
        self
    }

    /// Called for every change given up after [`give_up_after`](Self::give_up_after), on the
    /// writer task: keep it short. A panic in it is caught.
    #[must_use]
    pub fn on_dead_write(mut self, hook: impl Fn(&DeadWrite) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Carries the request's read-your-writes pin to every new session id (at
    /// [`create`](WriteBehindStore::create) and [`cycle_id`](WriteBehindStore::cycle_id)), with
    /// the scope found by [`current_scope`](distributed_core::current_scope).
    #[must_use]
    pub fn carry_pins(mut self, router: Arc<dyn PinCarrier>) -> Self {
        self.pins = Some(router);
        self
    }

    /// Starts the writer and maintenance tasks on the current tokio runtime. Both are
    /// [supervised](distributed_core::spawn_supervised): a panic in one is logged, counted
    /// (`distributed_task_restarts_total`) and the task restarted; the writer then retries
    /// the batch it was writing.
    ///
    /// # Errors
    /// [`SessionError::Config`] for a zero capacity or batch size, a zero timeout or cleanup
    /// interval, a backoff that starts at zero or ends below its start, any duration longer
    /// than [`MAX_DURATION_SETTING`], or outside a runtime.
    pub fn build(self) -> Result<WriteBehindStore<C, D>, SessionError> {
        let mut settings = self.settings;
        settings.validate()?;
        settings.tombstone_ttl = settings.tombstone_ttl.max(settings.give_up_after);
        // The tasks are spawned on the current runtime; there must be one.
        tokio::runtime::Handle::try_current()
            .map_err(|_| SessionError::Config("build() must run inside a tokio runtime"))?;
        let engine = Arc::new(Engine {
            outbox: Outbox::new(settings.capacity),
            cache: self.cache,
            db: self.db,
            settings,
            clock: crate::clock::VersionClock::default(),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            stale: Mutex::default(),
            cache_down_until: Mutex::default(),
            deleted: Mutex::default(),
            hook: self.hook,
            pins: self.pins,
            counters: Counters::default(),
        });
        let writer = {
            let engine = engine.clone();
            distributed_core::spawn_supervised("session_writer", move || {
                // A run after a panic: the batch the last one had taken goes back in the queue.
                engine.outbox.requeue_in_flight();
                run_writer(engine.clone())
            })
        };
        let maintenance = {
            let engine = engine.clone();
            distributed_core::spawn_supervised("session_maintenance", move || {
                run_maintenance(engine.clone())
            })
        };
        Ok(WriteBehindStore {
            tasks: Arc::new(Tasks {
                engine: engine.clone(),
                writer: Mutex::new(Some(writer)),
                maintenance,
            }),
            engine,
        })
    }
}

/// A session store that answers from the cache and writes the database behind the request.
///
/// - [`save`](Self::save) writes the cache (one round trip) and hands the database write to a
///   bounded outbox. One writer task coalesces saves of a session (the highest version wins),
///   writes batches under a version guard, retries with exponential backoff and jitter, and
///   reports a change it gives up on (metric `distributed_session_dead_writes_total`, the
///   [`on_dead_write`](WriteBehindBuilder::on_dead_write) hook, an error log): never silently.
///   A full outbox makes saves wait, then write through; a save is never dropped.
/// - [`load`](Self::load) looks at the outbox's pending value first, then the cache, then the
///   database (the leader), refilling the cache; when several hold the session (another
///   server saved it since this one's pending change), the higher version wins.
/// - [`delete`](Self::delete) removes the session from cache and database at once and cancels
///   its pending write; the database keeps a tombstone that no late write can overwrite.
/// - When the cache is down, saves write through to the database and loads read it; the
///   caller sees no error.
/// - [`flush`](Self::flush) waits for every accepted save; [`shutdown`](Self::shutdown)
///   drains the outbox and stops the tasks. A periodic task removes expired sessions.
///
/// Cheap to clone; clones share the engine. When the last clone is dropped without
/// `shutdown`, the writer still drains the outbox (as long as the runtime runs).
pub struct WriteBehindStore<C, D> {
    engine: Arc<Engine<C, D>>,
    tasks: Arc<Tasks<C, D>>,
}

impl<C, D> Clone for WriteBehindStore<C, D> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

impl<C, D> fmt::Debug for WriteBehindStore<C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehindStore")
            .field("pending", &self.engine.outbox.len())
            .field("settings", &self.engine.settings)
            .finish_non_exhaustive()
    }
}

struct Tasks<C, D> {
    engine: Arc<Engine<C, D>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    maintenance: JoinHandle<()>,
}

impl<C, D> Drop for Tasks<C, D> {
    fn drop(&mut self) {
        // The writer drains what was accepted, then stops by itself.
        self.engine.outbox.close();
        self.maintenance.abort();
    }
}

struct Engine<C, D> {
    cache: C,
    db: D,
    settings: Settings,
    outbox: Outbox,
    clock: crate::clock::VersionClock,
    stripes: Box<[Stripe]>,
    stale: Mutex<StaleCache>,
    /// The cache was unreachable: not asked again until then.
    cache_down_until: Mutex<Option<Instant>>,
    deleted: Mutex<RecentDeletes>,
    hook: Option<DeadWriteHook>,
    pins: Option<Arc<dyn PinCarrier>>,
    counters: Counters,
}

/// Sessions this engine deleted lately: a request racing its own logout cannot save them
/// back into the cache (the database's tombstone already refuses them).
#[derive(Default)]
struct RecentDeletes {
    ids: HashMap<SessionId, Instant>,
    order: std::collections::VecDeque<(Instant, SessionId)>,
}

impl RecentDeletes {
    fn insert(&mut self, id: SessionId, now: Instant, keep: Duration) {
        self.prune(now, keep);
        if self.ids.len() >= STALE_CAP
            && let Some((_, oldest)) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id, now);
        self.order.push_back((now, id));
    }

    fn contains(&mut self, id: &SessionId, now: Instant, keep: Duration) -> bool {
        self.prune(now, keep);
        self.ids.contains_key(id)
    }

    fn prune(&mut self, now: Instant, keep: Duration) {
        while let Some((at, id)) = self.order.front().copied() {
            if now.duration_since(at) < keep {
                break;
            }
            self.order.pop_front();
            // Only if not deleted again since.
            if self.ids.get(&id) == Some(&at) {
                self.ids.remove(&id);
            }
        }
    }
}

/// Orders the saves, deletes and cache refills of the sessions that hash to it.
#[derive(Default)]
struct Stripe {
    lock: tokio::sync::Mutex<()>,
    /// Counts saves and deletes, so that a load can tell whether its cache refill would
    /// overwrite something newer.
    generation: AtomicU64,
}

/// Sessions whose cache entry may be older than the database, because a cache write or
/// delete failed: loads skip the cache for them until a repair delete succeeds.
#[derive(Default)]
struct StaleCache {
    ids: HashMap<SessionId, u64>,
    generation: u64,
    /// Too many to remember: the whole cache is skipped until then.
    distrust_until: Option<Instant>,
}

impl<C: Cache + 'static, D: SessionDatabase> WriteBehindStore<C, D> {
    /// A builder over `cache` (shared by every app server) and `db` (the leader).
    pub fn builder(cache: C, db: D) -> WriteBehindBuilder<C, D> {
        WriteBehindBuilder {
            cache,
            db,
            settings: Settings::default(),
            hook: None,
            pins: None,
        }
    }

    /// Saves `record`; returns the version it was saved at.
    ///
    /// # Errors
    /// - [`SessionError::TooLarge`] / [`SessionError::Codec`]: the data; nothing was written.
    /// - [`SessionError::Deleted`]: this engine deleted the session within the last 10
    ///   minutes, or its tombstone is still waiting for the database (a request racing its
    ///   own logout; other servers' saves are refused by the tombstone in the database).
    /// - [`SessionError::Overloaded`]: the outbox stayed full and writing through failed.
    /// - [`SessionError::ShutDown`]: after [`shutdown`](Self::shutdown).
    pub async fn save(&self, record: &SessionRecord) -> Result<u64, SessionError> {
        self.engine.save(record).await
    }

    /// Saves `record` as a new session: gives it a fresh id first, and carries the request's
    /// pin to it (see [`WriteBehindBuilder::carry_pins`]).
    ///
    /// # Errors
    /// As [`save`](Self::save).
    pub async fn create(&self, record: &mut SessionRecord) -> Result<u64, SessionError> {
        record.id = SessionId::generate();
        let version = self.engine.save(record).await?;
        self.engine.carry_pins_to(&record.id).await;
        Ok(version)
    }

    /// The session `id`, unless it does not exist, was deleted or has expired.
    ///
    /// # Errors
    /// When the session is in neither outbox nor cache and the database cannot be read, or
    /// its stored data does not decode.
    pub async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, SessionError> {
        self.engine.load(id).await
    }

    /// [`load`](Self::load) by the text of an id (a cookie value): malformed text is rejected
    /// before any I/O.
    ///
    /// # Errors
    /// [`SessionError::InvalidId`], or as [`load`](Self::load).
    pub async fn load_str(&self, id: &str) -> Result<Option<SessionRecord>, SessionError> {
        let id = SessionId::parse(id)?;
        self.engine.load(&id).await
    }

    /// Deletes the session from cache and database and cancels its pending write. The
    /// database keeps a tombstone that no pending, in-flight or replayed write overwrites.
    /// When the database is down, the tombstone waits in the outbox (and this engine already
    /// answers loads with "no session").
    ///
    /// # Errors
    /// [`SessionError::ShutDown`] after [`shutdown`](Self::shutdown) when the database is
    /// down.
    pub async fn delete(&self, id: &SessionId) -> Result<(), SessionError> {
        self.engine.delete(id).await
    }

    /// Login: saves the session's data under a fresh id, deletes the old session, and
    /// carries the request's pin to the new id. Returns the new record.
    ///
    /// The new session is saved before the old one is deleted, so a failure leaves the user
    /// with the session they had.
    ///
    /// # Errors
    /// As [`save`](Self::save) and [`delete`](Self::delete).
    pub async fn cycle_id(&self, record: &SessionRecord) -> Result<SessionRecord, SessionError> {
        let mut fresh = record.clone();
        fresh.id = SessionId::generate();
        self.engine.save(&fresh).await?;
        self.engine.delete(&record.id).await?;
        self.engine.carry_pins_to(&fresh.id).await;
        Ok(fresh)
    }

    /// Returns when every save accepted before the call is in the database.
    ///
    /// # Errors
    /// [`SessionError::DeadWrites`] when changes were given up while it waited (each went to
    /// the dead-write hook).
    pub async fn flush(&self) -> Result<(), SessionError> {
        self.engine.flush().await
    }

    /// Stops accepting writes, drains the outbox into the database, and stops the tasks.
    /// With the database down this waits until the changes are written or given up, so
    /// bound it with a timeout if the process must exit by a deadline.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub async fn shutdown(&self) -> Result<(), SessionError> {
        self.engine.outbox.close();
        let flushed = self.engine.flush().await;
        let writer = lock(&self.tasks.writer).take();
        if let Some(writer) = writer {
            // The writer returns once closed and drained; a panic in it was already reported.
            let _ = writer.await;
        }
        self.tasks.maintenance.abort();
        flushed
    }

    /// Removes expired sessions and tombstones from the database now; returns how many.
    ///
    /// # Errors
    /// When the database call fails.
    pub async fn delete_expired(&self) -> Result<u64, SessionError> {
        self.engine.delete_expired().await
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.engine.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StoreStats {
            pending: self.engine.outbox.len(),
            queued: get(&c.queued),
            written_through: get(&c.written_through),
            batches: get(&c.batches),
            rows: get(&c.rows),
            failed_attempts: get(&c.failed_attempts),
            dead: get(&c.dead),
            backpressure_waits: get(&c.backpressure_waits),
            cache_errors: get(&c.cache_errors),
        }
    }

    /// The cache.
    pub fn cache(&self) -> &C {
        &self.engine.cache
    }

    /// The database.
    pub fn database(&self) -> &D {
        &self.engine.db
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single assignment or map operation.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Cache, D: SessionDatabase> Engine<C, D> {
    fn stripe(&self, id: &SessionId) -> &Stripe {
        &self.stripes[id.stripe(self.stripes.len())]
    }

    fn cache_key(&self, id: &SessionId) -> String {
        format!("{}{id}", self.settings.cache_prefix)
    }

    fn cache_ttl(&self, expires_at: SystemTime) -> Duration {
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        left.min(self.settings.cache_ttl)
            .max(Duration::from_secs(1))
    }

    fn cache_failed(&self, op: &'static str, error: &CacheError) {
        bump(&self.counters.cache_errors, 1);
        metrics::counter!("distributed_session_cache_errors_total", "op" => op).increment(1);
        tracing::debug!(error = %error, op, "session cache call failed");
    }

    async fn with_cache_timeout<T>(
        &self,
        call: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        if lock(&self.cache_down_until).is_some_and(|until| Instant::now() < until) {
            return Err(CacheError::Unavailable(
                "cache recently unreachable; not asked".into(),
            ));
        }
        let timeout = self.settings.cache_timeout;
        let result = tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(CacheError::Timeout(timeout)));
        if let (Err(e), Some(pause)) = (&result, self.settings.cache_retry_after)
            && e.is_unavailable()
        {
            *lock(&self.cache_down_until) = Some(Instant::now() + pause);
        }
        result
    }

    async fn with_db_timeout<T>(
        &self,
        call: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, SessionError> {
        let timeout = self.settings.db_timeout;
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(SessionError::DatabaseUnavailable(
                    format!("database call timed out after {timeout:?}").into(),
                ))
            })
    }

    /// Writes the session to the cache; on failure, remembers that the cache may now hold
    /// an older value.
    async fn cache_set(&self, id: &SessionId, version: u64, encoded: &Encoded) -> bool {
        let value = cache_value(version, encoded);
        let ttl = self.cache_ttl(encoded.expires_at);
        let key = self.cache_key(id);
        match self
            .with_cache_timeout(self.cache.set(&key, &value, ttl))
            .await
        {
            Ok(()) => {
                self.stale_cache().ids.remove(id);
                true
            }
            Err(e) => {
                self.cache_failed("set", &e);
                self.mark_stale(id);
                false
            }
        }
    }

    async fn cache_delete(&self, id: &SessionId) -> bool {
        let key = self.cache_key(id);
        match self.with_cache_timeout(self.cache.delete(&key)).await {
            Ok(()) => true,
            Err(e) => {
                self.cache_failed("delete", &e);
                self.mark_stale(id);
                false
            }
        }
    }

    fn stale_cache(&self) -> MutexGuard<'_, StaleCache> {
        lock(&self.stale)
    }

    fn mark_stale(&self, id: &SessionId) {
        let mut stale = self.stale_cache();
        stale.generation += 1;
        let generation = stale.generation;
        if stale.ids.len() >= STALE_CAP && !stale.ids.contains_key(id) {
            stale.distrust_until = Some(Instant::now() + self.settings.cache_ttl);
            metrics::counter!("distributed_session_cache_distrusted_total").increment(1);
        } else {
            stale.ids.insert(*id, generation);
        }
    }

    fn cache_trusted(&self, id: &SessionId) -> bool {
        let mut stale = self.stale_cache();
        if let Some(until) = stale.distrust_until {
            if Instant::now() < until {
                return false;
            }
            stale.distrust_until = None;
        }
        !stale.ids.contains_key(id)
    }

    /// Deletes cache entries that may be stale, now that the cache may answer again.
    async fn repair_cache(&self) {
        let batch: Vec<(SessionId, u64)> = {
            let stale = self.stale_cache();
            stale
                .ids
                .iter()
                .take(REPAIR_CHUNK)
                .map(|(id, generation)| (*id, *generation))
                .collect()
        };
        for (id, generation) in batch {
            let key = self.cache_key(&id);
            if self
                .with_cache_timeout(self.cache.delete(&key))
                .await
                .is_err()
            {
                // Still down: try again next round.
                return;
            }
            let mut stale = self.stale_cache();
            if stale.ids.get(&id) == Some(&generation) {
                stale.ids.remove(&id);
            }
        }
    }

    async fn write_rows(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        self.with_db_timeout(self.db.write(rows)).await
    }

    async fn save(&self, record: &SessionRecord) -> Result<u64, SessionError> {
        if self.outbox.is_closed() {
            return Err(SessionError::ShutDown);
        }
        let id = record.id;
        let encoded = Encoded::new(record, self.settings.max_session_bytes)?;
        let stripe = self.stripe(&id);
        let guard = stripe.lock.lock().await;
        if self.outbox.is_deleted(&id) || self.recently_deleted(&id) {
            return Err(SessionError::Deleted);
        }
        let reservation = match self.outbox.try_reserve(&id) {
            Some(reservation) => Some(reservation),
            None => {
                bump(&self.counters.backpressure_waits, 1);
                metrics::counter!("distributed_session_backpressure_waits_total").increment(1);
                self.outbox
                    .reserve(&id, self.settings.backpressure_timeout)
                    .await
            }
        };
        let version = self.clock.next();
        stripe.generation.fetch_add(1, Ordering::SeqCst);
        let cached = self.cache_set(&id, version, &encoded).await;
        let row = SessionRow {
            id: &id,
            version,
            data: Some(&encoded.json),
            expires_at: encoded.expires_at,
        };
        match reservation {
            Some(reservation) if cached => {
                if !self.outbox.accept(
                    Some(reservation),
                    id,
                    version,
                    Change::Live(encoded.clone()),
                ) {
                    self.cache_delete(&id).await;
                    return Err(SessionError::ShutDown);
                }
                self.saved("write_behind");
                bump(&self.counters.queued, 1);
            }
            Some(reservation) => {
                // Cache down: other servers can only find the session in the database.
                match self.write_rows(&[row]).await {
                    Ok(_) => {
                        drop(reservation);
                        self.outbox.supersede(&id, version);
                        self.saved("write_through");
                        bump(&self.counters.written_through, 1);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache and database both failed a session save; the writer retries it");
                        if !self.outbox.accept(
                            Some(reservation),
                            id,
                            version,
                            Change::Live(encoded.clone()),
                        ) {
                            return Err(SessionError::ShutDown);
                        }
                        self.saved("queued_cache_down");
                        bump(&self.counters.queued, 1);
                    }
                }
            }
            None => {
                // Outbox full for the whole timeout: write through, or tell the caller.
                match self.write_rows(&[row]).await {
                    Ok(_) => {
                        self.outbox.supersede(&id, version);
                        self.saved("write_through_full");
                        bump(&self.counters.written_through, 1);
                    }
                    Err(e) => {
                        if cached {
                            // Not accepted: the cache must not claim otherwise.
                            self.cache_delete(&id).await;
                        }
                        metrics::counter!("distributed_session_saves_refused_total").increment(1);
                        return Err(SessionError::Overloaded(Box::new(e)));
                    }
                }
            }
        }
        drop(guard);
        metrics::gauge!("distributed_session_outbox_pending").set(self.outbox.len() as f64);
        Ok(version)
    }

    fn recently_deleted(&self, id: &SessionId) -> bool {
        lock(&self.deleted).contains(id, Instant::now(), self.settings.delete_memory)
    }

    fn saved(&self, path: &'static str) {
        metrics::counter!("distributed_session_saves_total", "path" => path).increment(1);
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, SessionError> {
        let now = SystemTime::now();
        // This server's own unwritten change. Another server may have saved the session
        // since, so it competes with what the cache or database holds: the higher version wins.
        let pending = self.outbox.peek(id);
        if let Some((_, Change::Deleted { .. })) = pending {
            return Ok(None);
        }
        if pending.is_none() && self.recently_deleted(id) {
            return Ok(None);
        }
        let newest =
            |found: Option<(u64, Encoded)>| -> Result<Option<SessionRecord>, SessionError> {
                let pending = pending.clone().and_then(|(version, change)| match change {
                    Change::Live(encoded) => Some((version, encoded)),
                    Change::Deleted { .. } => None,
                });
                let best = match (pending, found) {
                    (Some(p), Some(f)) => Some(if f.0 > p.0 { f } else { p }),
                    (p, f) => p.or(f),
                };
                match best {
                    Some((_, encoded)) => live(id, Change::Live(encoded), now),
                    None => Ok(None),
                }
            };
        let stripe = self.stripe(id);
        let generation = stripe.generation.load(Ordering::SeqCst);
        let mut cache_up = true;
        if self.cache_trusted(id) {
            let key = self.cache_key(id);
            match self.with_cache_timeout(self.cache.get(&key)).await {
                Ok(Some(value)) => {
                    // A value that is not ours, or does not decode: the database decides.
                    if let Some((version, encoded)) = parse_cache_value(&value) {
                        self.clock.observe(version);
                        if encoded.decode(*id).is_ok() {
                            return newest(Some((version, encoded)));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.cache_failed("get", &e);
                    cache_up = false;
                }
            }
        }
        // The leader: a session saved a moment ago may not be on any follower yet.
        let stored = match self.with_db_timeout(self.db.load(id)).await {
            Ok(stored) => stored,
            // Our own pending change is an answer, even with the database away.
            Err(_) if pending.is_some() => return newest(None),
            Err(e) => return Err(e),
        };
        let Some(stored) = stored else {
            return newest(None);
        };
        self.clock.observe(stored.version);
        let Some(json) = stored.data else {
            // A tombstone is final: whatever is pending here will not be written over it.
            return Ok(None);
        };
        let encoded = Encoded {
            json: json.into(),
            expires_at: stored.expires_at,
        };
        if pending.is_some() {
            return newest(Some((stored.version, encoded)));
        }
        let Some(record) = live(id, Change::Live(encoded.clone()), now)? else {
            return Ok(None);
        };
        if cache_up {
            // Refill only if no save or delete of this stripe runs or ran meanwhile: the
            // value read may be older than what they wrote. (A busy stripe skips the refill.)
            let quiet = stripe.lock.try_lock();
            if quiet.is_ok()
                && stripe.generation.load(Ordering::SeqCst) == generation
                && self.outbox.peek(id).is_none()
            {
                let value = cache_value(stored.version, &encoded);
                let ttl = self.cache_ttl(encoded.expires_at);
                let key = self.cache_key(id);
                match self
                    .with_cache_timeout(self.cache.set(&key, &value, ttl))
                    .await
                {
                    Ok(()) => {
                        self.stale_cache().ids.remove(id);
                    }
                    Err(e) => self.cache_failed("refill", &e),
                }
            }
        }
        Ok(Some(record))
    }

    async fn delete(&self, id: &SessionId) -> Result<(), SessionError> {
        let stripe = self.stripe(id);
        let _guard = stripe.lock.lock().await;
        stripe.generation.fetch_add(1, Ordering::SeqCst);
        let version = self.clock.next();
        lock(&self.deleted).insert(*id, Instant::now(), self.settings.delete_memory);
        // Cancel first: nothing of this session is taken by the writer from here on. A write
        // already in flight carries an older version, which the tombstone beats.
        self.outbox.cancel(id);
        self.cache_delete(id).await;
        let expires_at = SystemTime::now()
            .checked_add(self.settings.tombstone_ttl)
            .unwrap_or_else(SystemTime::now);
        let tombstone = SessionRow {
            id,
            version,
            data: None,
            expires_at,
        };
        metrics::counter!("distributed_session_deletes_total").increment(1);
        if let Err(e) = self.write_rows(&[tombstone]).await {
            tracing::warn!(error = %e, "session tombstone not written; the writer retries it");
            if !self
                .outbox
                .accept(None, *id, version, Change::Deleted { expires_at })
            {
                return Err(SessionError::ShutDown);
            }
        }
        Ok(())
    }

    async fn carry_pins_to(&self, id: &SessionId) {
        let (Some(pins), Some(scope)) = (&self.pins, current_scope()) else {
            return;
        };
        if let Err(e) = pins
            .carry_pins(&scope, ScopeKey::from(id.to_string()))
            .await
        {
            metrics::counter!("distributed_session_pin_carry_failures_total").increment(1);
            tracing::warn!(error = %e, "could not carry the request's pin to its new session id");
        }
    }

    async fn flush(&self) -> Result<(), SessionError> {
        let target = self.outbox.last_seq();
        let dead_before = self.outbox.dead_total();
        loop {
            let progress = self.outbox.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.outbox.flushed_through(target) {
                break;
            }
            progress.await;
        }
        let dead = self.outbox.dead_total() - dead_before;
        if dead > 0 {
            return Err(SessionError::DeadWrites { count: dead });
        }
        Ok(())
    }

    async fn delete_expired(&self) -> Result<u64, SessionError> {
        let removed = self.with_db_timeout(self.db.delete_expired()).await?;
        metrics::counter!("distributed_session_expired_deleted_total").increment(removed);
        Ok(removed)
    }

    /// Writes `items` in one statement; if the database rejects the batch (as opposed to
    /// being unreachable), writes them one by one so a bad row sinks only itself.
    /// Returns the failed items and the last error.
    async fn write_items(&self, items: Vec<Item>) -> (Vec<Item>, Option<SessionError>) {
        let result = self.write_rows(&rows(&items)).await;
        let error = match result {
            Ok(_) => {
                self.written(&items);
                return (Vec::new(), None);
            }
            Err(e) => e,
        };
        if error.is_transient() || items.len() == 1 {
            return (items, Some(error));
        }
        let mut failed = Vec::new();
        let mut last = error;
        for item in items {
            let one = std::slice::from_ref(&item);
            match self.write_rows(&rows(one)).await {
                Ok(_) => self.written(one),
                Err(e) => {
                    last = e;
                    failed.push(item);
                }
            }
        }
        (failed, Some(last))
    }

    fn written(&self, items: &[Item]) {
        bump(&self.counters.batches, 1);
        bump(&self.counters.rows, items.len() as u64);
        metrics::counter!("distributed_session_db_batches_total").increment(1);
        metrics::histogram!("distributed_session_db_batch_rows").record(items.len() as f64);
        self.outbox.complete(items);
    }

    fn report_dead(&self, dead: Vec<Dead>, error: &Arc<SessionError>) {
        for dead in dead {
            bump(&self.counters.dead, 1);
            metrics::counter!("distributed_session_dead_writes_total").increment(1);
            tracing::error!(
                error = %error,
                attempts = dead.attempts,
                "session write given up after the retry bound; the session is not in the database"
            );
            if let Some(hook) = &self.hook {
                let report = DeadWrite {
                    id: dead.id,
                    version: dead.version,
                    attempts: dead.attempts,
                    error: error.clone(),
                };
                if std::panic::catch_unwind(AssertUnwindSafe(|| hook(&report))).is_err() {
                    tracing::error!("the dead-write hook panicked");
                }
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .settings
            .retry_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.settings.retry_max);
        let half = exp / 2;
        half + rand::rng().random_range(Duration::ZERO..=exp - half)
    }
}

/// The record a pending change or loaded value stands for, unless deleted or expired.
fn live(
    id: &SessionId,
    change: Change,
    now: SystemTime,
) -> Result<Option<SessionRecord>, SessionError> {
    match change {
        Change::Deleted { .. } => Ok(None),
        Change::Live(encoded) if encoded.expires_at <= now => Ok(None),
        Change::Live(encoded) => encoded.decode(*id).map(Some),
    }
}

fn rows(items: &[Item]) -> Vec<SessionRow<'_>> {
    items
        .iter()
        .map(|item| match &item.change {
            Change::Live(encoded) => SessionRow {
                id: &item.id,
                version: item.version,
                data: Some(&encoded.json),
                expires_at: encoded.expires_at,
            },
            Change::Deleted { expires_at } => SessionRow {
                id: &item.id,
                version: item.version,
                data: None,
                expires_at: *expires_at,
            },
        })
        .collect()
}

async fn run_writer<C: Cache, D: SessionDatabase>(engine: Arc<Engine<C, D>>) {
    let mut failures = 0u32;
    loop {
        let work = engine.outbox.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let items = engine.outbox.take(engine.settings.batch_size);
        if items.is_empty() {
            if engine.outbox.is_finished() {
                return;
            }
            work.await;
            continue;
        }
        let (failed, error) = engine.write_items(items).await;
        metrics::gauge!("distributed_session_outbox_pending").set(engine.outbox.len() as f64);
        let Some(error) = error else {
            failures = 0;
            continue;
        };
        failures = failures.saturating_add(1);
        bump(&engine.counters.failed_attempts, 1);
        metrics::counter!("distributed_session_db_write_failures_total", "kind" => error.label())
            .increment(1);
        tracing::warn!(error = %error, rows = failed.len(), "session batch not written; retrying");
        let dead = engine.outbox.fail(&failed, engine.settings.give_up_after);
        engine.report_dead(dead, &Arc::new(error));
        tokio::time::sleep(engine.backoff(failures)).await;
    }
}

async fn run_maintenance<C: Cache, D: SessionDatabase>(engine: Arc<Engine<C, D>>) {
    let mut repair = tokio::time::interval(engine.settings.repair_interval);
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cleanup = engine.settings.cleanup_interval.map(|every| {
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    loop {
        let cleanup_tick = async {
            match &mut cleanup {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = repair.tick() => {
                let has_stale = !engine.stale_cache().ids.is_empty();
                if has_stale {
                    engine.repair_cache().await;
                }
            }
            _ = cleanup_tick => {
                if let Err(e) = engine.delete_expired().await {
                    tracing::warn!(error = %e, "expired sessions not removed; next round retries");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
