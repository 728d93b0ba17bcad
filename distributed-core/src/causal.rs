//! Causal mode: read-your-writes by WAL position instead of by time, monotonic reads, and an
//! on-demand check of a follower's position.
//!
//! Time mode pins a scope to the leader for a fixed window after each write: too short and the
//! scope reads stale data, too long and the leader serves reads a follower could. Causal mode
//! remembers *where* in the leader's log each scope last wrote (the adapter reports
//! `pg_current_wal_insert_lsn()` right after the write) and reads from any follower that has
//! replayed that far, which is usually a fraction of the window later — and stays correct
//! however far a follower falls behind.
//!
//! - [`CausalTracker`] is the [`RecentlyUpdated`] that stores positions in a [`Cache`]. Alone,
//!   inside a [`DistributedRouter`], it gives read-your-writes by position.
//! - [`CausalRouter`] wraps that router and adds monotonic reads (a scope never reads a
//!   follower behind what it read before) and, optionally, asks a follower for its position on
//!   demand when the monitor's last measurement is too old to say.
//! - A scope's requirement travels as a [`ConsistencyToken`](crate::ConsistencyToken).

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::health::{FollowerPicker, FollowerSet, RandomPicker};
use crate::recently::{CachedRouter, RecentlyUpdated, SessionCachedRouter, Subject};
use crate::router::{DistributedRouter, Router, record_read};
use crate::scope::is_leader_forced;
use crate::{
    BoxError, Cache, CacheError, Config, ConsistencyToken, Decision, Freshness, NodeProbe, Reason,
    Scope, ScopeKey, Target, WalPosition,
};

/// How many locks serialize read-modify-writes of positions within one process.
const LOCK_STRIPES: usize = 64;

/// A [`RecentlyUpdated`] that keeps, per scope (and per table, as an option), the WAL position
/// of its last write and of the newest data it read, in a [`Cache`].
///
/// - After a write at a known position, the scope's reads need a follower that has replayed
///   it: [`Freshness::AtLeast`]. The stored position only rises: a write that committed
///   earlier but is recorded later does not lower it.
/// - After a write whose position the adapter does not know, the scope falls back to time
///   mode: the leader for the lag window ([`Freshness::Leader`]), exactly like
///   [`SessionCachedRouter`] — with the same keys, so switching modes keeps existing pins.
/// - With [monotonic reads](Self::monotonic_reads) (off by default), the newest position the
///   scope read from, recorded by [`CausalRouter`], is a requirement too.
///
/// # Cache entries and their lifetimes
///
/// Three small entries per scope (per table in [per-table](Self::per_table) mode), looked up
/// together, once per request:
///
/// | entry | value | lives |
/// |---|---|---|
/// | time-mode pin | `1` | the lag window |
/// | last write position | `v1.<hex>` | [`position_ttl`](Self::position_ttl), 1 h by default |
/// | newest read position | `v1.<hex>` | [`position_ttl`](Self::position_ttl) |
///
/// A position is harmless to keep long: once every follower has replayed it, it sends no read
/// anywhere but where it would have gone anyway. It must outlive the longest lag at which a
/// follower still serves reads ([`Config::max_follower_lag`], plus one probe interval), or a
/// scope could read a follower behind its write once the entry is gone. The default hour
/// covers any `max_follower_lag` up to about that; each entry costs a few dozen bytes per
/// active scope. The one case against a long lifetime: a cluster rebuilt from scratch
/// restarts its log at a lower position, and scopes holding a higher one read the leader
/// until their entries expire (a failover keeps positions rising, and needs nothing).
///
/// # Concurrency
///
/// Raising a position is a read-modify-write, and the [`Cache`] trait has no compare-and-set.
/// Within one process, a striped lock makes it exact. Two requests of the *same* scope writing
/// at the same moment on *different* app servers can still race, leaving the lower of their
/// two positions stored: that scope's next request may then read a follower that has the
/// first write but not yet the second, for at most the follower's replay delay.
///
/// ```
/// use std::time::Duration;
/// use distributed_core::{CausalTracker, Config, DistributedRouter, MemoryCache, Reason,
///                        Router, Scope, WalPosition};
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let config = Config::builder()
///     .leader("leader", "postgres://leader/app")
///     .follower("near", "postgres://follower/app")
///     .build()?;
/// let router = DistributedRouter::new(
///     config.clone(),
///     CausalTracker::new(MemoryCache::new(), config.lag_window()),
/// );
/// router.record_write(Some(&Scope::new("alice")), None, Some(WalPosition(0x500))).await?;
///
/// // Alice's next request: the follower has not replayed her write yet.
/// router.followers().observe_replayed(0, WalPosition(0x4FF));
/// let read = router.route_read(Some(&Scope::new("alice")), None).await;
/// assert_eq!(read.reason, Reason::RecentWrite);
/// // A moment later it has: her reads go back to the follower, long before a time window ends.
/// router.followers().observe_replayed(0, WalPosition(0x500));
/// let read = router.route_read(Some(&Scope::new("alice")), None).await;
/// assert_eq!(read.reason, Reason::CaughtUpFollower);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct CausalTracker<C> {
    pins: SessionCachedRouter<C>,
    prefix: String,
    per_table: bool,
    position_ttl: Duration,
    monotonic: bool,
    locks: Arc<[tokio::sync::Mutex<()>]>,
}

impl<C> fmt::Debug for CausalTracker<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CausalTracker")
            .field("prefix", &self.prefix)
            .field("per_table", &self.per_table)
            .field("position_ttl", &self.position_ttl)
            .field("monotonic", &self.monotonic)
            .finish_non_exhaustive()
    }
}

impl<C: Cache> CausalTracker<C> {
    /// How long a stored position lives by default: one hour.
    pub const DEFAULT_POSITION_TTL: Duration = Duration::from_secs(60 * 60);

    /// Positions in `cache`; writes of unknown position pin the leader for `lag_window`.
    pub fn new(cache: C, lag_window: Duration) -> Self {
        Self {
            pins: SessionCachedRouter::new(cache, lag_window),
            prefix: SessionCachedRouter::<C>::DEFAULT_PREFIX.to_owned(),
            per_table: false,
            position_ttl: Self::DEFAULT_POSITION_TTL,
            monotonic: false,
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// Keeps positions per table instead of per scope, like
    /// [`SessionCachedRouter::per_table`]: a write to a table requires its position of reads of
    /// that table and of reads naming no table. Monotonic reads are then per table too.
    #[must_use]
    pub fn per_table(mut self, per_table: bool) -> Self {
        self.pins = self.pins.per_table(per_table);
        self.per_table = per_table;
        self
    }

    /// Prefixes every key, to share a cache between applications. The default is
    /// [`SessionCachedRouter::DEFAULT_PREFIX`], so time-mode pins stay valid in causal mode.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self.pins = self.pins.prefix(self.prefix.clone());
        self
    }

    /// How long stored positions live (see the [type docs](Self) for how to choose).
    #[must_use]
    pub fn position_ttl(mut self, ttl: Duration) -> Self {
        self.position_ttl = ttl;
        self
    }

    /// Whether the newest position each scope read from is kept and required of its later
    /// reads (recorded by [`CausalRouter`]), so that nothing a user saw vanishes on the next
    /// page load. Off by default, for a reason measured in the demo: a read of the leader
    /// records the leader's position, which the followers reach one replication delay later.
    /// A scope that reads more often than that, while others write, is held on the leader
    /// (in `cargo xtask demo`, 12 sessions reading every ~250 ms with followers 1 s behind:
    /// the follower share fell from 52% to 9%). Turn it on where going back in time is worse
    /// than a busier leader. It costs one more cache entry per lookup and, now and then, a
    /// store.
    #[must_use]
    pub fn monotonic_reads(mut self, on: bool) -> Self {
        self.monotonic = on;
        self
    }

    /// Whether monotonic reads are on.
    pub fn is_monotonic(&self) -> bool {
        self.monotonic
    }

    /// The cache.
    pub fn cache(&self) -> &C {
        self.pins.cache()
    }

    /// Raises the newest position `subject` is known to have read from to `position`.
    ///
    /// # Errors
    /// When the cache fails; nothing is lowered then.
    pub async fn mark_read_at(
        &self,
        subject: Subject<'_>,
        position: WalPosition,
    ) -> Result<(), CacheError> {
        self.raise(&self.key('r', subject), position)
            .await
            .map(drop)
    }

    /// The cache key of a position entry: `kind` is `w` (write) or `r` (read).
    fn key(&self, kind: char, subject: Subject<'_>) -> String {
        let scope = subject.scope.as_str();
        // As for pins: the scope's length goes first, so no (scope, table) pair spells another's.
        match (self.per_table, subject.table) {
            (true, Some(table)) => {
                format!("{}{kind}t:{}:{scope}:{table}", self.prefix, scope.len())
            }
            _ => format!("{}{kind}s:{scope}", self.prefix),
        }
    }

    fn pin_key(&self, subject: Subject<'_>) -> Option<String> {
        CachedRouter::cache_key(&self.pins, subject)
    }

    async fn position(&self, key: &str) -> Result<Option<WalPosition>, CacheError> {
        match self.cache().get(key).await? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some),
        }
    }

    async fn pinned(&self, subject: Subject<'_>) -> Result<bool, CacheError> {
        match self.pin_key(subject) {
            Some(key) => Ok(self.cache().get(&key).await?.is_some()),
            None => Ok(false),
        }
    }

    /// What reads of `subject` need, in two parts: what its writes need (the leader under a
    /// time-mode pin, else its last write's position) and, with monotonic reads, the newest
    /// position it read at. [`freshness`](RecentlyUpdated::freshness) is their maximum. One
    /// round trip: the entries are looked up concurrently.
    pub(crate) async fn requirements(
        &self,
        subject: Subject<'_>,
    ) -> Result<(Freshness, Option<WalPosition>), CacheError> {
        let write_key = self.key('w', subject);
        let read_key = self.key('r', subject);
        let (pinned, write, read) =
            tokio::join!(self.pinned(subject), self.position(&write_key), async {
                if self.monotonic {
                    self.position(&read_key).await
                } else {
                    Ok(None)
                }
            });
        // A pin alone decides, even when the other lookups failed: the leader is always safe.
        if pinned? {
            return Ok((Freshness::Leader, None));
        }
        Ok((at_least(write?), read?))
    }

    /// Stores `position` under `key` unless a higher one is there; returns the higher of the two.
    async fn raise(&self, key: &str, position: WalPosition) -> Result<WalPosition, CacheError> {
        let _serialized = self.lock_for(key).lock().await;
        let stored = self.position(key).await?;
        if stored.is_some_and(|stored| stored >= position) {
            return Ok(stored.unwrap_or(position));
        }
        let value = ConsistencyToken::at_least(position).to_string();
        self.cache()
            .set(key, value.as_bytes(), self.position_ttl)
            .await?;
        Ok(position)
    }

    fn lock_for(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = (hasher.finish() % self.locks.len() as u64) as usize;
        &self.locks[stripe]
    }
}

/// A stored position, written by [`CausalTracker::raise`].
fn decode(bytes: &[u8]) -> Result<WalPosition, CacheError> {
    let corrupt = |e: crate::TokenError| CacheError::Backend(Box::new(e));
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt(crate::TokenError::Malformed))?;
    match ConsistencyToken::parse(text).map_err(corrupt)?.freshness() {
        Freshness::AtLeast(position) => Ok(position),
        Freshness::Any => Ok(WalPosition(0)),
        Freshness::Leader => Err(corrupt(crate::TokenError::BadPosition)),
    }
}

/// Whether a read at `position` moves the scope past what it already needs.
fn moved_past(known: Freshness, position: WalPosition) -> bool {
    match known {
        Freshness::Any => true,
        Freshness::AtLeast(known) => position > known,
        // A time-mode pin (or a leader token) hides the stored read position: the store
        // compares.
        Freshness::Leader => true,
    }
}

fn at_least(position: Option<WalPosition>) -> Freshness {
    position.map_or(Freshness::Any, |p| {
        ConsistencyToken::at_least(p).freshness()
    })
}

#[async_trait]
impl<C: Cache> RecentlyUpdated for CausalTracker<C> {
    /// Whether a time-mode pin (a write of unknown position) holds the scope on the leader.
    async fn is_recently_updated(&self, subject: Subject<'_>) -> Result<bool, CacheError> {
        self.pinned(subject).await
    }

    /// A write of unknown position: the time-mode pin.
    async fn mark_updated(&self, subject: Subject<'_>) -> Result<(), CacheError> {
        RecentlyUpdated::mark_updated(&self.pins, subject).await
    }

    fn per_table(&self) -> bool {
        self.per_table
    }

    /// The leader under a time-mode pin; otherwise a follower at or past the scope's last
    /// write and (with monotonic reads) its newest read. One round trip: the entries are looked
    /// up concurrently.
    async fn freshness(&self, subject: Subject<'_>) -> Result<Freshness, CacheError> {
        let (wrote, read) = self.requirements(subject).await?;
        Ok(wrote.max(at_least(read)))
    }

    /// Stores the write's position (keeping the higher one), or without a position, pins the
    /// leader for the lag window. Returns what the rest of the request needs: the stored
    /// position, or the leader if a pin holds. When the position cannot be stored, it still
    /// tries to pin the leader for the window, and returns the error.
    async fn mark_updated_at(
        &self,
        subject: Subject<'_>,
        position: Option<WalPosition>,
    ) -> Result<Freshness, CacheError> {
        let Some(position) = position else {
            RecentlyUpdated::mark_updated(&self.pins, subject).await?;
            return Ok(Freshness::Leader);
        };
        let key = self.key('w', subject);
        let (pinned, stored) = tokio::join!(self.pinned(subject), self.raise(&key, position));
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                // The position could not be stored. A time-mode pin, if the cache takes it,
                // still covers lags within the window; the caller hears of the failure.
                let _ = RecentlyUpdated::mark_updated(&self.pins, subject).await;
                return Err(e);
            }
        };
        // The position is stored; if the pin could not be checked, the leader is the safe answer.
        Ok(match pinned {
            Ok(false) => at_least(Some(stored)),
            Ok(true) | Err(_) => Freshness::Leader,
        })
    }
}

/// The router for causal mode: a [`DistributedRouter`] over a [`CausalTracker`], plus
/// monotonic reads and an on-demand check of a follower's position.
///
/// - **Read-your-writes by position**: adapters pass the position of every write to
///   [`Router::record_write`]; the scope's later reads go to a follower that has replayed it.
/// - **Monotonic reads** (when the tracker's are on): each read is recorded at the position its
///   server was known to be at (a follower's last measured replayed position, or the leader's
///   last measured position); later reads of the scope need at least that. Within a request,
///   reads stay on the first follower read while it can serve them, and the position is
///   stored at most once per request (per table in per-table mode), only when it moved forward
///   and some follower is not yet known to be past it. A [forced](crate::force_leader) read
///   counts as a read of the leader. A read that only this holds on the leader (a follower
///   could serve what the scope wrote) says so: [`Reason::MonotonicFloor`]. Exact: see below.
/// - **On-demand check** ([`probe_on_demand`](Self::probe_on_demand) when building, or
///   [`attach_probe`](Self::attach_probe) once the pool that owns the probe exists): when a
///   read needs a position no follower is known to have reached, the router asks the follower
///   known to be furthest for its current position, at most once per request and within a
///   short timeout, before giving up on followers and reading the leader. The answer also
///   updates what every other request knows. A failed or slow check sends the read to the
///   leader; it does not mark the follower down (the monitor decides that).
///
/// Feed it with [`spawn_monitor`](crate::spawn_monitor), which also records the leader's
/// position.
///
/// # What is known, and how precisely
///
/// Followers' replayed positions come from the [monitor](crate::spawn_monitor): each is a lower
/// bound, stale by up to one probe interval. Read-your-writes is exact regardless: a follower
/// is chosen only when its *known* position has reached the write's. Monotonic reads are exact
/// too: a read is recorded ([`Router::record_read`]) at an *upper* bound of what it could have
/// returned, its server's position asked on the same connection after the read when the
/// adapter releases it, and later reads go to servers *known* to be at least there. A read
/// counts once its connection is released; the request's newest positions are stored once,
/// when it ends ([`Router::end_request`], run by [`with_scope`](crate::with_scope)).
///
/// ```
/// use distributed_core::{CausalRouter, CausalTracker, Config, ConsistencyToken, Decision,
///                        MemoryCache, Reason, Router, Scope, Target, WalPosition};
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let config = Config::builder()
///     .leader("leader", "postgres://leader/app")
///     .follower("near", "postgres://follower/app")
///     .build()?;
/// let tracker = CausalTracker::new(MemoryCache::new(), config.lag_window()).monotonic_reads(true);
/// let router = CausalRouter::new(config, tracker);
/// // What the monitor measured: the leader at 0x900, the follower at 0x700.
/// router.followers().record_leader(WalPosition(0x900));
/// router.followers().observe_replayed(0, WalPosition(0x700));
///
/// // Carol's request needs 0x800 (a token from another service, say): the leader serves it,
/// // and Carol has now seen data as of 0x900.
/// let token = ConsistencyToken::at_least(WalPosition(0x800));
/// let first = Scope::new("carol").with_token(&token);
/// let read = router.route_read(Some(&first), None).await;
/// assert_eq!(read.target, Target::Leader);
/// // What an adapter does once the read is done: the leader said it was at 0x900.
/// router.record_read(&first, None, read, Some(WalPosition(0x900))).await;
/// router.end_request(&first).await;
///
/// // Her next request needs nothing of its own, yet does not go back in time to the follower...
/// let second = Scope::new("carol");
/// let read = router.route_read(Some(&second), None).await;
/// assert_eq!(read, Decision::leader(Reason::MonotonicFloor));
/// // ...until it has replayed what she saw.
/// router.followers().observe_replayed(0, WalPosition(0x900));
/// let third = Scope::new("carol");
/// let read = router.route_read(Some(&third), None).await;
/// assert_eq!((read.target, read.reason), (Target::Follower(0), Reason::CaughtUpFollower));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct CausalRouter<C, P = RandomPicker> {
    inner: DistributedRouter<CausalTracker<C>, P>,
    /// Set once, when building or later through `&self`: the pool that owns the probe is
    /// usually built after the router.
    probe: OnceLock<Arc<dyn NodeProbe>>,
    probe_timeout: Duration,
}

impl<C, P: fmt::Debug> fmt::Debug for CausalRouter<C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CausalRouter")
            .field("inner", &self.inner)
            .field("probe_on_demand", &self.probe.get().is_some())
            .field("probe_timeout", &self.probe_timeout)
            .finish()
    }
}

/// What a read of a scope needs, in two parts.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// For its own writes and the tokens it was given.
    wrote: Freshness,
    /// Monotonic reads: the newest position it is known to have read at.
    read: Option<WalPosition>,
}

impl Need {
    const ANY: Need = Need {
        wrote: Freshness::Any,
        read: None,
    };

    fn all(self) -> Freshness {
        self.wrote.max(at_least(self.read))
    }
}

impl<C: Cache> CausalRouter<C, RandomPicker> {
    /// A causal router over `config`, keeping positions in `tracker`, picking followers at
    /// random.
    pub fn new(config: Config, tracker: CausalTracker<C>) -> Self {
        Self::with_picker(config, tracker, RandomPicker)
    }
}

impl<C: Cache, P: FollowerPicker> CausalRouter<C, P> {
    /// The default timeout of an on-demand check: 50 ms, a round trip to a nearby follower
    /// with room to spare, and far less than a read sent to a distant leader costs.
    pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(50);

    /// A causal router that picks followers with `picker`.
    pub fn with_picker(config: Config, tracker: CausalTracker<C>, picker: P) -> Self {
        Self {
            inner: DistributedRouter::with_picker(config, tracker, picker),
            probe: OnceLock::new(),
            probe_timeout: Self::DEFAULT_PROBE_TIMEOUT,
        }
    }

    /// Asks a follower for its position through `probe` when the monitor's last measurement
    /// cannot tell whether any follower has reached what a read needs (at most once per
    /// request). Usually the same probe the monitor uses; when that probe belongs to a pool
    /// built after the router, see [`attach_probe`](Self::attach_probe).
    #[must_use]
    pub fn probe_on_demand(mut self, probe: Arc<dyn NodeProbe>) -> Self {
        self.probe = OnceLock::from(probe);
        self
    }

    /// The on-demand check of [`probe_on_demand`](Self::probe_on_demand), turned on after
    /// the router was built and shared: adapters build their pool (and its probe) from the
    /// router, so the probe exists only afterwards.
    ///
    /// With `distributed-sqlx` or `distributed-bb8`, whose pools hand out the probe their
    /// monitor uses:
    ///
    /// ```text
    /// let pool = DistributedPool::connect(config, CausalRouter::new(config.clone(), tracker)).await?;
    /// pool.router().attach_probe(pool.probe());
    /// ```
    ///
    /// In general:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use distributed_core::{BoxError, CausalRouter, CausalTracker, Config, MemoryCache,
    ///                        NodeProbe, WalPosition};
    ///
    /// struct Probe; // two queries against the servers, in an adapter
    ///
    /// #[async_trait::async_trait]
    /// impl NodeProbe for Probe {
    ///     async fn leader_position(&self) -> Result<WalPosition, BoxError> {
    ///         Ok(WalPosition(0x900))
    ///     }
    ///     async fn follower_position(&self, _: usize) -> Result<WalPosition, BoxError> {
    ///         Ok(WalPosition(0x900))
    ///     }
    /// }
    ///
    /// let config = Config::builder()
    ///     .leader("leader", "postgres://leader/app")
    ///     .follower("near", "postgres://follower/app")
    ///     .build()?;
    /// let tracker = CausalTracker::new(MemoryCache::new(), config.lag_window());
    /// let router = Arc::new(CausalRouter::new(config, tracker));
    /// // ... the pool is built from (a clone of) the router, and owns the probe ...
    /// assert!(router.attach_probe(Arc::new(Probe)));
    /// assert!(router.probes_on_demand());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Returns whether `probe` was attached: `false` when the router already had one, which
    /// stays (a probe is set once, so reads never race a change).
    pub fn attach_probe(&self, probe: Arc<dyn NodeProbe>) -> bool {
        self.probe.set(probe).is_ok()
    }

    /// Whether reads check a follower on demand (a probe is attached).
    pub fn probes_on_demand(&self) -> bool {
        self.probe.get().is_some()
    }

    /// How long an on-demand check may take before the read goes to the leader instead.
    /// Default [`DEFAULT_PROBE_TIMEOUT`](Self::DEFAULT_PROBE_TIMEOUT).
    #[must_use]
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// The position store.
    pub fn tracker(&self) -> &CausalTracker<C> {
        self.inner.recently()
    }

    /// See [`DistributedRouter::token`]; it also carries what the scope read.
    ///
    /// # Errors
    /// When the cache could not answer.
    pub async fn token(&self, scope: &Scope) -> Result<ConsistencyToken, CacheError> {
        let need = self.need(scope, None).await?;
        Ok(scope.token().max(ConsistencyToken::new(need.all())))
    }

    /// What reads of `table` need for `scope`. The tracker is asked at most once per memo key
    /// and request, as [`DistributedRouter`] does, but here its answer is kept in two parts,
    /// so that a read held on the leader can say by which. `Err` means the cache could not
    /// answer.
    async fn need(&self, scope: &Scope, table: Option<&str>) -> Result<Need, CacheError> {
        let memo_key = self.inner.memo_key(table);
        if scope.memo(memo_key).is_none()
            && !scope.cache_failed()
            && let Some(key) = scope.key()
        {
            let subject = Subject {
                scope: &key,
                table: memo_key,
            };
            match self
                .inner
                .with_timeout(self.tracker().requirements(subject))
                .await
            {
                Ok((wrote, read)) => {
                    scope.raise(memo_key, wrote);
                    if let Some(read) = read {
                        scope.see(memo_key, read);
                        // Stored already: the end of the request stores only what is newer.
                        scope.claim_read_store(memo_key, read);
                    }
                }
                Err(e) => {
                    scope.set_cache_failed();
                    return Err(e);
                }
            }
        }
        // Now memoized: the memo (writes, lookups) and the tokens, without asking the cache.
        let wrote = self.inner.need(scope, table).await?;
        Ok(Need {
            wrote,
            read: scope.seen(memo_key),
        })
    }

    async fn route_scoped(&self, scope: &Scope, table: Option<&str>) -> Decision {
        let need = match self.need(scope, table).await {
            Ok(need) => need,
            Err(e) => {
                tracing::debug!(error = %e, "position store unavailable; reading the leader");
                return Decision::leader(Reason::CacheUnavailable);
            }
        };
        let decision = self.decide(scope, need).await;
        if self.tracker().is_monotonic() {
            self.note_read(scope, table, decision);
        }
        decision
    }

    async fn decide(&self, scope: &Scope, need: Need) -> Decision {
        let all = need.all();
        if all == Freshness::Leader {
            return Decision::leader(Reason::RecentWrite);
        }
        let reason = match all {
            Freshness::AtLeast(_) => Reason::CaughtUpFollower,
            _ => Reason::HealthyFollower,
        };
        let candidates = self.followers().candidates(all);
        if !candidates.eligible.is_empty() {
            let sticky = scope
                .sticky()
                .filter(|i| self.tracker().is_monotonic() && candidates.eligible.contains(i));
            let index = sticky.unwrap_or_else(|| self.inner.picker().pick(&candidates.eligible));
            return Decision::follower(index, reason);
        }
        if let Freshness::AtLeast(position) = all
            && let Some(index) = self.check_on_demand(scope, position).await
        {
            return Decision::follower(index, reason);
        }
        Decision::leader(self.leader_reason(need, candidates.any_up))
    }

    /// Why no follower serves a read needing `need` (none could, and none caught up on
    /// demand).
    fn leader_reason(&self, need: Need, any_up: bool) -> Reason {
        if !any_up {
            return Reason::NoHealthyFollower;
        }
        // Held by what the scope read, not by what it wrote: a follower could serve the
        // writes alone.
        if need.all() > need.wrote && !self.followers().candidates(need.wrote).eligible.is_empty() {
            return Reason::MonotonicFloor;
        }
        match need.wrote {
            Freshness::Any => Reason::FollowersLagging,
            _ => Reason::RecentWrite,
        }
    }

    /// Asks the furthest available follower whether it has reached `position` now.
    async fn check_on_demand(&self, scope: &Scope, position: WalPosition) -> Option<usize> {
        let probe = self.probe.get()?;
        let followers = self.followers();
        let index = followers.furthest_available()?;
        if !scope.claim_probe() {
            return None;
        }
        let outcome = tokio::time::timeout(self.probe_timeout, probe.follower_position(index))
            .await
            .map_err(|_| -> BoxError { "timed out".into() })
            .and_then(|answer| answer);
        let caught_up = match outcome {
            Ok(replayed) => {
                followers.observe_replayed(index, replayed);
                replayed >= position
            }
            Err(e) => {
                tracing::debug!(follower = followers.name(index), error = %e, "on-demand position check failed");
                metrics::counter!("distributed_position_checks_total", "outcome" => "failed")
                    .increment(1);
                return None;
            }
        };
        let outcome = if caught_up { "caught_up" } else { "behind" };
        metrics::counter!("distributed_position_checks_total", "outcome" => outcome).increment(1);
        caught_up.then_some(index)
    }

    /// Everything the rest of this request's reads of `memo_key` need, as far as it knows
    /// without asking the cache.
    fn known(&self, scope: &Scope, memo_key: Option<&str>) -> Freshness {
        scope
            .memo(memo_key)
            .unwrap_or_default()
            .max(scope.floor())
            .max(at_least(scope.seen(memo_key)))
    }

    /// Monotonic reads, when a read is routed: keeps the rest of the request on the follower it
    /// chose, and raises what the rest of the request needs to where that server is *known* to
    /// be. That is a lower bound of what the read will see, kept in memory only, for a read
    /// routed while this one's connection is still held; what the scope has seen is recorded
    /// (and stored for later requests) from an upper bound, in [`Router::record_read`], once
    /// the connection is released.
    fn note_read(&self, scope: &Scope, table: Option<&str>, decision: Decision) {
        let followers = self.followers();
        let position = match decision.target {
            Target::Follower(index) => {
                scope.set_sticky(index);
                followers.replayed(index)
            }
            Target::Leader => followers.leader_position(),
        };
        let Some(position) = position else { return };
        let memo_key = self.inner.memo_key(table);
        if decision.reason == Reason::Forced {
            // Not the memo: a memo entry would stand in for a lookup this read skipped.
            scope.see_everywhere(position);
        } else if moved_past(self.known(scope, memo_key), position) {
            scope.see(memo_key, position);
        }
    }

    /// Stores that the scope read at `position`, unless it was stored (or looked up) before.
    async fn store_read(&self, scope: &Scope, memo_key: Option<&str>, position: WalPosition) {
        // Without a key there is nowhere to keep it; after a failed lookup the cache is not
        // asked again in this request; and once every follower is known past the position, no
        // server can be behind it again.
        let Some(key) = scope.key() else { return };
        if scope.cache_failed()
            || self.followers().all_replayed(position)
            || !scope.claim_read_store(memo_key, position)
        {
            return;
        }
        let subject = Subject {
            scope: &key,
            table: memo_key,
        };
        if let Err(e) = self
            .inner
            .with_timeout(self.tracker().mark_read_at(subject, position))
            .await
        {
            metrics::counter!("distributed_read_mark_failures_total").increment(1);
            tracing::debug!(error = %e, "could not store a read position; later reads may be less monotonic");
        }
    }
}

#[async_trait]
impl<C: Cache, P: FollowerPicker> Router for CausalRouter<C, P> {
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        let monotonic = self.tracker().is_monotonic();
        if let Some(scope) = scope
            && monotonic
        {
            // What this scope's earlier reads saw must be known before deciding this one.
            scope.settle().await;
        }
        let decision = if is_leader_forced() {
            let forced = Decision::leader(Reason::Forced);
            if let Some(scope) = scope
                && monotonic
            {
                self.note_read(scope, table, forced);
            }
            forced
        } else if self.followers().is_empty() {
            Decision::leader(Reason::NoFollowers)
        } else {
            match scope {
                Some(scope) => self.route_scoped(scope, table).await,
                None => self.decide(&Scope::anonymous(), Need::ANY).await,
            }
        };
        record_read(self.followers(), decision);
        decision
    }

    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError> {
        self.inner.record_write(scope, table, position).await
    }

    fn followers(&self) -> &FollowerSet {
        self.inner.followers()
    }

    fn tracks_reads(&self) -> bool {
        self.tracker().is_monotonic()
    }

    /// Monotonic reads: the scope has now seen data as of `seen`, an upper bound of what the
    /// read returned; the rest of the request and (stored) the scope's later requests need at
    /// least that. Without a position (the server did not say), the leader's current one
    /// stands in when an on-demand probe can ask for it, else the rest of this request reads
    /// the leader.
    async fn record_read(
        &self,
        scope: &Scope,
        table: Option<&str>,
        decision: Decision,
        seen: Option<WalPosition>,
    ) {
        if !self.tracker().is_monotonic() {
            return;
        }
        let seen = match seen {
            Some(seen) => Some(seen),
            None => match self.probe.get() {
                Some(probe) => tokio::time::timeout(self.probe_timeout, probe.leader_position())
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            },
        };
        let memo_key = self.inner.memo_key(table);
        let Some(position) = seen else {
            metrics::counter!("distributed_read_position_failures_total").increment(1);
            tracing::warn!(
                "could not learn where a read's server was; this request reads the leader"
            );
            scope.raise(memo_key, Freshness::Leader);
            return;
        };
        if decision.reason == Reason::Forced {
            scope.see_everywhere(position);
        } else {
            scope.see(memo_key, position);
        }
    }

    /// Monotonic reads: stores the newest position the request read at, per memo key, where
    /// it moved past what the scope's earlier requests had stored.
    async fn end_request(&self, scope: &Scope) {
        if !self.tracker().is_monotonic() {
            return;
        }
        for (memo_key, position) in scope.seen_entries() {
            self.store_read(scope, memo_key.as_deref(), position).await;
        }
    }

    /// Carries the scope's pins to the new key as [`DistributedRouter`] does and, with
    /// monotonic reads, what it read, as read positions.
    async fn rekey(&self, scope: &Scope, key: Option<ScopeKey>) -> Result<(), CacheError> {
        let mut result = Ok(());
        // The old key's entries from earlier requests, learned in their two parts (the inner
        // router then finds them memoized). Not knowing them, it pins the leader: safe.
        if let Some(old) = scope.key()
            && key.as_ref() != Some(&old)
            && let Err(e) = self.need(scope, None).await
        {
            result = Err(e);
        }
        let carried = self.inner.rekey(scope, key.clone()).await;
        if let Some(key) = key
            && self.tracker().is_monotonic()
        {
            for (table, position) in scope.seen_entries() {
                let subject = Subject {
                    scope: &key,
                    table: table.as_deref(),
                };
                if let Err(e) = self
                    .inner
                    .with_timeout(self.tracker().mark_read_at(subject, position))
                    .await
                {
                    result = Err(e);
                }
            }
        }
        result.and(carried)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::{MemoryCache, RoundRobinPicker};

    /// A memory cache that counts calls, yields between them (so concurrent marks interleave),
    /// and can be made to fail.
    #[derive(Default)]
    struct CountingCache {
        inner: MemoryCache,
        gets: AtomicUsize,
        sets: AtomicUsize,
        down: AtomicBool,
    }

    #[async_trait]
    impl Cache for CountingCache {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(CacheError::Unavailable("down".into()));
            }
            self.inner.get(key).await
        }
        async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
            self.sets.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(CacheError::Unavailable("down".into()));
            }
            self.inner.set(key, value, ttl).await
        }
        async fn delete(&self, key: &str) -> Result<(), CacheError> {
            self.inner.delete(key).await
        }
    }

    const WINDOW: Duration = Duration::from_secs(2);

    fn tracker() -> (CausalTracker<Arc<CountingCache>>, Arc<CountingCache>) {
        let cache = Arc::new(CountingCache::default());
        (
            CausalTracker::new(cache.clone(), WINDOW).monotonic_reads(true),
            cache,
        )
    }

    fn config(followers: usize) -> Config {
        let mut b = Config::builder()
            .leader("l", "l")
            .lag_window(WINDOW)
            .readmit_ramp(Duration::from_millis(1));
        for i in 0..followers {
            b = b.follower(format!("f{i}"), format!("f{i}"));
        }
        b.build().unwrap()
    }

    fn causal(
        followers: usize,
    ) -> (
        CausalRouter<Arc<CountingCache>, RoundRobinPicker>,
        Arc<CountingCache>,
    ) {
        let (t, cache) = tracker();
        let r = CausalRouter::with_picker(config(followers), t, RoundRobinPicker::default());
        (r, cache)
    }

    fn at(p: u64) -> Freshness {
        Freshness::AtLeast(WalPosition(p))
    }

    fn subject(key: &ScopeKey) -> Subject<'_> {
        Subject {
            scope: key,
            table: None,
        }
    }

    #[tokio::test]
    async fn a_later_marked_earlier_write_does_not_lower_the_position() {
        let (t, _) = tracker();
        let a = ScopeKey::from("a");
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), Freshness::Any);
        let after = t.mark_updated_at(subject(&a), Some(WalPosition(10))).await;
        assert_eq!(after.unwrap(), at(10));
        let after = t.mark_updated_at(subject(&a), Some(WalPosition(5))).await;
        assert_eq!(
            after.unwrap(),
            at(10),
            "the request still needs the newer write"
        );
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), at(10));
        t.mark_updated_at(subject(&a), Some(WalPosition(11)))
            .await
            .unwrap();
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), at(11));
        assert_eq!(
            t.freshness(subject(&ScopeKey::from("b"))).await.unwrap(),
            Freshness::Any
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_marks_in_one_process_keep_the_highest() {
        for round in 0..20u64 {
            let (t, _) = tracker();
            let t = Arc::new(t);
            let tasks: Vec<_> = (1..=16u64)
                .map(|i| {
                    let t = t.clone();
                    // Marked in an order unrelated to the positions.
                    let position = WalPosition((i * 7 + round) % 16 + 1);
                    tokio::spawn(async move {
                        let key = ScopeKey::from("a");
                        t.mark_updated_at(subject(&key), Some(position)).await
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap().unwrap();
            }
            let key = ScopeKey::from("a");
            assert_eq!(t.freshness(subject(&key)).await.unwrap(), at(16));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_position_falls_back_to_the_time_window() {
        let (t, _) = tracker();
        let a = ScopeKey::from("a");
        t.mark_updated_at(subject(&a), Some(WalPosition(10)))
            .await
            .unwrap();
        let after = t.mark_updated_at(subject(&a), None).await.unwrap();
        assert_eq!(after, Freshness::Leader);
        assert!(t.is_recently_updated(subject(&a)).await.unwrap());
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), Freshness::Leader);
        // A positioned write inside the window does not lift the pin: the unknown write may be
        // the later one.
        let after = t.mark_updated_at(subject(&a), Some(WalPosition(20))).await;
        assert_eq!(after.unwrap(), Freshness::Leader);
        tokio::time::advance(WINDOW).await;
        assert!(!t.is_recently_updated(subject(&a)).await.unwrap());
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), at(20));
    }

    #[tokio::test(start_paused = true)]
    async fn positions_outlive_the_window_until_their_own_ttl() {
        let cache = Arc::new(CountingCache::default());
        let t = CausalTracker::new(cache, WINDOW).position_ttl(Duration::from_secs(60));
        let a = ScopeKey::from("a");
        t.mark_updated_at(subject(&a), Some(WalPosition(10)))
            .await
            .unwrap();
        tokio::time::advance(WINDOW * 10).await;
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), at(10));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(t.freshness(subject(&a)).await.unwrap(), Freshness::Any);
    }

    #[tokio::test]
    async fn read_positions_count_only_with_monotonic_reads() {
        let a = ScopeKey::from("a");
        for monotonic in [true, false] {
            let cache = Arc::new(CountingCache::default());
            let t = CausalTracker::new(cache.clone(), WINDOW).monotonic_reads(monotonic);
            t.mark_read_at(subject(&a), WalPosition(30)).await.unwrap();
            t.mark_read_at(subject(&a), WalPosition(20)).await.unwrap();
            t.mark_updated_at(subject(&a), Some(WalPosition(25)))
                .await
                .unwrap();
            let expected = if monotonic { at(30) } else { at(25) };
            assert_eq!(t.freshness(subject(&a)).await.unwrap(), expected);
            let gets = cache.gets.load(Ordering::SeqCst);
            t.freshness(subject(&a)).await.unwrap();
            let per_lookup = cache.gets.load(Ordering::SeqCst) - gets;
            assert_eq!(per_lookup, if monotonic { 3 } else { 2 });
        }
    }

    #[tokio::test]
    async fn a_corrupt_entry_is_a_cache_error_and_the_read_goes_to_the_leader() {
        let (r, cache) = causal(1);
        cache
            .inner
            .set("distributed:pin:ws:a", b"garbage", Duration::from_secs(9))
            .await
            .unwrap();
        let key = ScopeKey::from("a");
        let err = r.tracker().freshness(subject(&key)).await.unwrap_err();
        assert!(matches!(err, CacheError::Backend(_)), "{err:?}");
        assert_eq!(
            r.route_read(Some(&Scope::new("a")), None).await,
            Decision::leader(Reason::CacheUnavailable)
        );
    }

    #[tokio::test]
    async fn keys_do_not_collide() {
        let cache = Arc::new(CountingCache::default());
        let t = CausalTracker::new(cache, WINDOW).per_table(true);
        let (ab, a) = (ScopeKey::from("a:b"), ScopeKey::from("a"));
        let s = |scope, table| Subject { scope, table };
        t.mark_updated_at(s(&ab, Some("c")), Some(WalPosition(1)))
            .await
            .unwrap();
        assert_eq!(t.freshness(s(&ab, Some("c"))).await.unwrap(), at(1));
        assert_eq!(
            t.freshness(s(&a, Some("b:c"))).await.unwrap(),
            Freshness::Any
        );
        assert_eq!(t.freshness(s(&ab, None)).await.unwrap(), Freshness::Any);
        assert_eq!(
            t.freshness(s(&ab, Some("d"))).await.unwrap(),
            Freshness::Any
        );
    }

    #[tokio::test]
    async fn reads_go_to_a_follower_as_soon_as_it_has_the_write() {
        let (r, _) = causal(2);
        let w = Scope::new("a");
        r.record_write(Some(&w), None, Some(WalPosition(100)))
            .await
            .unwrap();
        // The writing request itself reads the leader: no follower is known to have it.
        assert_eq!(
            r.route_read(Some(&w), None).await,
            Decision::leader(Reason::RecentWrite)
        );
        r.followers().observe_replayed(0, WalPosition(99));
        r.followers().observe_replayed(1, WalPosition(100));
        for _ in 0..5 {
            let d = r.route_read(Some(&Scope::new("a")), None).await;
            assert_eq!(d, Decision::follower(1, Reason::CaughtUpFollower));
        }
        // Other scopes read any follower.
        let other = r.route_read(Some(&Scope::new("b")), None).await;
        assert_eq!(other.reason, Reason::HealthyFollower);
    }

    #[tokio::test]
    async fn per_table_positions_cover_their_table_and_unnamed_reads() {
        let (t, _) = tracker();
        let r = CausalRouter::new(config(1), t.per_table(true));
        r.record_write(Some(&Scope::new("a")), Some("posts"), Some(WalPosition(50)))
            .await
            .unwrap();
        r.followers().observe_replayed(0, WalPosition(40));
        let s = Scope::new("a");
        assert_eq!(
            r.route_read(Some(&s), Some("posts")).await.target,
            Target::Leader
        );
        assert_eq!(r.route_read(Some(&s), None).await.target, Target::Leader);
        let users = r.route_read(Some(&s), Some("users")).await;
        assert_eq!(users, Decision::follower(0, Reason::HealthyFollower));
    }

    /// What an adapter does for one read: routes it, runs it, then records where its server was
    /// after it (here, where the monitor last saw it: the test's servers stand still; a leader
    /// the monitor never saw reports 0).
    async fn read_in_request<C: Cache, P: FollowerPicker>(
        r: &CausalRouter<C, P>,
        scope: Option<&Scope>,
        table: Option<&str>,
    ) -> Decision {
        let decision = r.route_read(scope, table).await;
        if let Some(scope) = scope {
            let seen = match decision.target {
                Target::Leader => r.followers().leader_position().unwrap_or_default(),
                Target::Follower(i) => r.followers().replayed(i).unwrap_or_default(),
            };
            r.record_read(scope, table, decision, Some(seen)).await;
        }
        decision
    }

    /// A read, and the end of its request as far as the router knows (storing what it read):
    /// for a request of one read, or in place of the last read of a request.
    async fn read<C: Cache, P: FollowerPicker>(
        r: &CausalRouter<C, P>,
        scope: Option<&Scope>,
        table: Option<&str>,
    ) -> Decision {
        let decision = read_in_request(r, scope, table).await;
        if let Some(scope) = scope {
            r.end_request(scope).await;
        }
        decision
    }

    #[tokio::test(start_paused = true)]
    async fn monotonic_reads_never_go_back_to_a_follower_behind_what_was_read() {
        for monotonic in [true, false] {
            let cache = Arc::new(CountingCache::default());
            let t = CausalTracker::new(cache, WINDOW).monotonic_reads(monotonic);
            let r = CausalRouter::with_picker(config(2), t, RoundRobinPicker::default());
            r.followers().observe_replayed(0, WalPosition(90));
            r.followers().observe_replayed(1, WalPosition(80));
            // The first request can only read follower 0, at 90.
            r.followers().mark_down(1);
            let first = Scope::new("a");
            assert_eq!(
                read(&r, Some(&first), None).await.target,
                Target::Follower(0)
            );
            r.followers().mark_up(1);
            tokio::time::advance(Duration::from_millis(5)).await;
            let targets: Vec<_> = futures_targets(&r, "a", 6).await;
            if monotonic {
                assert!(
                    targets.iter().all(|t| *t == Target::Follower(0)),
                    "{targets:?}"
                );
            } else {
                assert!(targets.contains(&Target::Follower(1)), "{targets:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_counts_at_where_its_server_was_after_it_not_where_it_was_known_to_be() {
        let (r, _) = causal(2);
        // The monitor last saw both followers at 90.
        r.followers().observe_replayed(0, WalPosition(90));
        r.followers().observe_replayed(1, WalPosition(90));
        r.followers().mark_down(1);
        let first = Scope::new("a");
        let d = r.route_read(Some(&first), None).await;
        assert_eq!(d.target, Target::Follower(0));
        // Follower 0 had replayed to 95 by then: the read may have returned data as of 95.
        r.record_read(&first, None, d, Some(WalPosition(95))).await;
        r.end_request(&first).await;
        r.followers().mark_up(1);
        r.followers().mark_down(0);
        tokio::time::advance(Duration::from_millis(5)).await;
        // Follower 1, known at 90 (and perhaps really there), must not serve the next request.
        let next = r.route_read(Some(&Scope::new("a")), None).await;
        assert_eq!(next, Decision::leader(Reason::MonotonicFloor));
        r.followers().observe_replayed(1, WalPosition(95));
        let later = r.route_read(Some(&Scope::new("a")), None).await;
        assert_eq!(later, Decision::follower(1, Reason::CaughtUpFollower));
    }

    #[tokio::test]
    async fn a_read_whose_server_did_not_say_holds_the_rest_of_its_request_on_the_leader() {
        let (r, _) = causal(1);
        r.followers().observe_replayed(0, WalPosition(90));
        let s = Scope::new("a");
        let d = r.route_read(Some(&s), None).await;
        r.record_read(&s, None, d, None).await;
        assert_eq!(r.route_read(Some(&s), None).await.target, Target::Leader);
    }

    /// The first read target of each of `requests` new requests of scope `key`.
    async fn futures_targets<C: Cache, P: FollowerPicker>(
        r: &CausalRouter<C, P>,
        key: &str,
        requests: usize,
    ) -> Vec<Target> {
        let mut targets = Vec::new();
        for _ in 0..requests {
            targets.push(read(r, Some(&Scope::new(key)), None).await.target);
        }
        targets
    }

    #[tokio::test]
    async fn a_leader_read_is_recorded_at_the_leaders_known_position() {
        let (r, _) = causal(1);
        r.followers().record_leader(WalPosition(500));
        r.followers().observe_replayed(0, WalPosition(400));
        let first = Scope::new("a").with_token(&ConsistencyToken::leader());
        assert_eq!(read(&r, Some(&first), None).await.target, Target::Leader);
        let key = ScopeKey::from("a");
        assert_eq!(r.tracker().freshness(subject(&key)).await.unwrap(), at(500));
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Leader
        );
        r.followers().observe_replayed(0, WalPosition(500));
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Follower(0)
        );
    }

    #[tokio::test]
    async fn a_forced_read_counts_for_monotonic_reads() {
        let (r, _) = causal(1);
        r.followers().record_leader(WalPosition(500));
        r.followers().observe_replayed(0, WalPosition(400));
        let first = Scope::new("a");
        let d = crate::force_leader(read(&r, Some(&first), None)).await;
        assert_eq!(d, Decision::leader(Reason::Forced));
        // The rest of the request, and the next one, do not go back to the follower.
        assert_eq!(read(&r, Some(&first), None).await.target, Target::Leader);
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Leader
        );
        r.followers().observe_replayed(0, WalPosition(500));
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Follower(0)
        );
        // Without a scope, or with monotonic reads off, a forced read records nothing.
        let (t, _) = tracker();
        let r = CausalRouter::new(config(1), t.monotonic_reads(false));
        r.followers().record_leader(WalPosition(500));
        r.followers().observe_replayed(0, WalPosition(400));
        crate::force_leader(read(&r, Some(&Scope::new("a")), None)).await;
        crate::force_leader(read(&r, None, None)).await;
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Follower(0)
        );
    }

    #[tokio::test]
    async fn read_positions_are_stored_at_most_once_per_request_and_only_when_needed() {
        let (r, cache) = causal(2);
        r.followers().observe_replayed(0, WalPosition(10));
        r.followers().observe_replayed(1, WalPosition(10));
        // Every follower is past what a read sees: nothing to remember, nothing stored.
        let s = Scope::new("a");
        for _ in 0..5 {
            read(&r, Some(&s), None).await;
        }
        assert_eq!(cache.sets.load(Ordering::SeqCst), 0);
        // Follower 1 is further: a read of it is worth storing, once per request.
        r.followers().observe_replayed(1, WalPosition(20));
        let s = Scope::new("a");
        let mut reads = Vec::new();
        for _ in 0..6 {
            reads.push(read_in_request(&r, Some(&s), None).await.target);
            r.followers()
                .observe_replayed(1, WalPosition(20 + reads.len() as u64));
        }
        r.end_request(&s).await;
        assert!(cache.sets.load(Ordering::SeqCst) <= 1);
        // Within the request, reads stay on one follower.
        assert!(reads.windows(2).all(|w| w[0] == w[1]), "{reads:?}");
        // Anonymous scopes store nothing.
        let before = cache.sets.load(Ordering::SeqCst);
        read(&r, Some(&Scope::anonymous()), None).await;
        read(&r, None, None).await;
        assert_eq!(cache.sets.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn a_failed_read_store_does_not_fail_the_read() {
        let (r, cache) = causal(2);
        r.followers().observe_replayed(0, WalPosition(10));
        let s = Scope::new("a");
        read(&r, Some(&s), None).await; // looked up while the cache works
        cache.down.store(true, Ordering::SeqCst);
        r.followers().observe_replayed(0, WalPosition(20));
        let d = read(&r, Some(&s), None).await;
        assert_eq!(d.target, Target::Follower(0));
    }

    /// A follower whose position is whatever the test says, counting how often it is asked.
    #[derive(Default)]
    struct FakeProbe {
        position: std::sync::atomic::AtomicU64,
        calls: AtomicUsize,
        slow: AtomicBool,
        failing: AtomicBool,
    }

    #[async_trait]
    impl NodeProbe for FakeProbe {
        async fn leader_position(&self) -> Result<WalPosition, BoxError> {
            Ok(WalPosition(u64::MAX))
        }
        async fn follower_position(&self, _: usize) -> Result<WalPosition, BoxError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            Ok(WalPosition(self.position.load(Ordering::SeqCst)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_is_asked_on_demand_at_most_once_per_request() {
        let probe = Arc::new(FakeProbe::default());
        let (r, _) = causal(2);
        let r = r.probe_on_demand(probe.clone());
        r.followers().observe_replayed(0, WalPosition(90));
        r.followers().observe_replayed(1, WalPosition(95));
        r.record_write(Some(&Scope::new("a")), None, Some(WalPosition(100)))
            .await
            .unwrap();

        // Still behind when asked: the leader, and only one question for the whole request.
        probe.position.store(99, Ordering::SeqCst);
        let s = Scope::new("a");
        for _ in 0..3 {
            assert_eq!(
                read(&r, Some(&s), None).await,
                Decision::leader(Reason::RecentWrite)
            );
        }
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            r.followers().replayed(1),
            Some(WalPosition(99)),
            "asked the furthest"
        );

        // Caught up now: the next request reads it, and others learn of it without asking.
        probe.position.store(100, Ordering::SeqCst);
        let s = Scope::new("a");
        assert_eq!(
            read(&r, Some(&s), None).await,
            Decision::follower(1, Reason::CaughtUpFollower)
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await.target,
            Target::Follower(1)
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);

        // Reads that need nothing never ask.
        read(&r, Some(&Scope::new("b")), None).await;
        read(&r, None, None).await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_failing_check_reads_the_leader_within_the_timeout() {
        let probe = Arc::new(FakeProbe::default());
        let (r, _) = causal(1);
        let r = r
            .probe_on_demand(probe.clone())
            .probe_timeout(Duration::from_millis(20));
        r.record_write(Some(&Scope::new("a")), None, Some(WalPosition(100)))
            .await
            .unwrap();
        probe.position.store(100, Ordering::SeqCst);
        probe.slow.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let d = read(&r, Some(&Scope::new("a")), None).await;
        assert_eq!(d, Decision::leader(Reason::RecentWrite));
        assert_eq!(started.elapsed(), Duration::from_millis(20));

        probe.slow.store(false, Ordering::SeqCst);
        probe.failing.store(true, Ordering::SeqCst);
        let d = read(&r, Some(&Scope::new("a")), None).await;
        assert_eq!(d, Decision::leader(Reason::RecentWrite));
        assert!(
            r.followers().is_up(0),
            "a failed check does not mark it down"
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
    }

    /// Scope `a` has seen data as of 500 (a forced read of the leader), and wrote at `wrote`
    /// before; the followers are at 400 and 420. Where its next request reads, and why.
    async fn after_seeing_500(monotonic: bool, wrote: Option<u64>) -> Decision {
        let (t, _) = tracker();
        let r = CausalRouter::new(config(2), t.monotonic_reads(monotonic));
        r.followers().record_leader(WalPosition(500));
        if let Some(wrote) = wrote {
            r.record_write(Some(&Scope::new("a")), None, Some(WalPosition(wrote)))
                .await
                .unwrap();
        }
        r.followers().observe_replayed(0, WalPosition(400));
        r.followers().observe_replayed(1, WalPosition(420));
        crate::force_leader(read(&r, Some(&Scope::new("a")), None)).await;
        read(&r, Some(&Scope::new("a")), None).await
    }

    #[tokio::test]
    async fn a_read_held_on_the_leader_by_what_the_scope_read_says_so() {
        // Nothing written: only the monotonic floor keeps it off the followers.
        assert_eq!(
            after_seeing_500(true, None).await,
            Decision::leader(Reason::MonotonicFloor)
        );
        // A write both followers have: still the floor.
        assert_eq!(
            after_seeing_500(true, Some(300)).await,
            Decision::leader(Reason::MonotonicFloor)
        );
        // A write no follower has: the write holds it there, whatever was read.
        assert_eq!(
            after_seeing_500(true, Some(450)).await,
            Decision::leader(Reason::RecentWrite)
        );
        // Without monotonic reads the same script reads a follower.
        let d = after_seeing_500(false, None).await;
        assert_eq!(d.reason, Reason::HealthyFollower);
        let d = after_seeing_500(false, Some(300)).await;
        assert_eq!(d.reason, Reason::CaughtUpFollower);
        assert!(matches!(d.target, Target::Follower(_)));
        assert_eq!(
            after_seeing_500(false, Some(450)).await,
            Decision::leader(Reason::RecentWrite)
        );
    }

    #[tokio::test]
    async fn the_floor_is_told_apart_within_a_request_and_from_lagging_followers() {
        let (r, _) = causal(2);
        r.followers().record_leader(WalPosition(500));
        r.followers().observe_replayed(0, WalPosition(400));
        r.followers().observe_replayed(1, WalPosition(400));
        // A token from a write no follower has: a write, whoever made it.
        let job = Scope::from_token(&ConsistencyToken::at_least(WalPosition(450)));
        assert_eq!(
            read(&r, Some(&job), None).await,
            Decision::leader(Reason::RecentWrite)
        );
        // Within one request: after a leader read, the rest of it is held by the floor.
        let s = Scope::new("b");
        crate::force_leader(read(&r, Some(&s), None)).await;
        assert_eq!(
            read(&r, Some(&s), None).await,
            Decision::leader(Reason::MonotonicFloor)
        );
        // Followers too far behind to serve anyone: that is the reason, not the floor.
        r.followers()
            .record(0, Duration::from_secs(3600), WalPosition(400));
        r.followers()
            .record(1, Duration::from_secs(3600), WalPosition(400));
        assert_eq!(
            read(&r, Some(&Scope::new("b")), None).await,
            Decision::leader(Reason::FollowersLagging)
        );
    }

    #[tokio::test]
    async fn rekey_carries_reads_as_reads_and_writes_as_writes() {
        let (r, _) = causal(1);
        r.followers().record_leader(WalPosition(500));
        r.followers().observe_replayed(0, WalPosition(400));
        let login = Scope::new("old");
        crate::force_leader(read(&r, Some(&login), None)).await;
        r.rekey(&login, Some("new".into())).await.unwrap();
        assert_eq!(
            read(&r, Some(&Scope::new("new")), None).await,
            Decision::leader(Reason::MonotonicFloor)
        );
        // From an earlier request of the old key, learned at the login.
        r.record_write(Some(&Scope::new("old2")), None, Some(WalPosition(450)))
            .await
            .unwrap();
        let login = Scope::new("old2");
        r.rekey(&login, Some("new2".into())).await.unwrap();
        assert_eq!(
            read(&r, Some(&Scope::new("new2")), None).await,
            Decision::leader(Reason::RecentWrite)
        );
        let key = ScopeKey::from("new");
        assert_eq!(r.tracker().freshness(subject(&key)).await.unwrap(), at(500));
        r.followers().observe_replayed(0, WalPosition(500));
        assert_eq!(
            read(&r, Some(&Scope::new("new")), None).await,
            Decision::follower(0, Reason::CaughtUpFollower)
        );
    }

    #[tokio::test]
    async fn a_probe_attached_after_sharing_the_router_is_used_once_set() {
        let (r, _) = causal(1);
        let r = Arc::new(r);
        assert!(!r.probes_on_demand());
        r.record_write(Some(&Scope::new("a")), None, Some(WalPosition(100)))
            .await
            .unwrap();
        let probe = Arc::new(FakeProbe::default());
        probe.position.store(100, Ordering::SeqCst);
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await,
            Decision::leader(Reason::RecentWrite),
            "no probe yet: nobody asks the follower"
        );
        assert!(r.attach_probe(probe.clone()));
        assert!(r.probes_on_demand());
        assert!(
            !r.attach_probe(Arc::new(FakeProbe::default())),
            "the first probe stays"
        );
        assert_eq!(
            read(&r, Some(&Scope::new("a")), None).await,
            Decision::follower(0, Reason::CaughtUpFollower)
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
        // A probe given when building cannot be replaced either.
        let (built, _) = causal(1);
        let built = built.probe_on_demand(probe.clone());
        assert!(!built.attach_probe(Arc::new(FakeProbe::default())));
    }

    #[tokio::test]
    async fn a_token_carries_the_write_to_a_job_without_a_session() {
        let (r, _) = causal(1);
        let request = Scope::new("a");
        r.record_write(Some(&request), None, Some(WalPosition(0x10)))
            .await
            .unwrap();
        let payload = r.token(&request).await.unwrap().to_string();
        assert_eq!(payload, "v1.10");
        // A later request of the scope gets the same token from the cache.
        let later = r.token(&Scope::new("a")).await.unwrap();
        assert_eq!(later.to_string(), payload);

        let job = Scope::from_token(&payload.parse().unwrap());
        r.followers().observe_replayed(0, WalPosition(0xF));
        assert_eq!(read(&r, Some(&job), None).await.target, Target::Leader);
        r.followers().observe_replayed(0, WalPosition(0x10));
        assert_eq!(
            read(&r, Some(&job), None).await,
            Decision::follower(0, Reason::CaughtUpFollower)
        );
    }

    #[tokio::test]
    async fn a_cache_outage_reads_the_leader_and_fails_the_mark() {
        let (r, cache) = causal(1);
        cache.down.store(true, Ordering::SeqCst);
        let s = Scope::new("a");
        assert_eq!(
            read(&r, Some(&s), None).await,
            Decision::leader(Reason::CacheUnavailable)
        );
        let w = Scope::new("w");
        assert!(
            r.record_write(Some(&w), None, Some(WalPosition(5)))
                .await
                .is_err()
        );
        assert_eq!(read(&r, Some(&w), None).await.target, Target::Leader);
        assert!(r.token(&Scope::new("x")).await.is_err());
    }

    #[tokio::test]
    async fn forced_and_followerless() {
        let (r, _) = causal(0);
        assert_eq!(
            read(&r, None, None).await,
            Decision::leader(Reason::NoFollowers)
        );
        let (r, _) = causal(1);
        let d = crate::force_leader(read(&r, None, None)).await;
        assert_eq!(d, Decision::leader(Reason::Forced));
        let r: Arc<dyn Router> = Arc::new(r);
        assert_eq!(r.route_read(None, None).await.target, Target::Follower(0));
    }
}
