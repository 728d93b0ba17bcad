//! The routing decision.

use std::sync::Arc;

use async_trait::async_trait;

use crate::health::{FollowerPicker, FollowerSet, RandomPicker};
use crate::recently::{RecentlyUpdated, Subject};
use crate::scope::{Freshness, Scope, ScopeKey, is_leader_forced};
use crate::{CacheError, Config, ConsistencyToken, Decision, Reason, Target, WalPosition};

/// Decides where each statement goes. Adapters (`distributed-sqlx`, `distributed-bb8`) hold one
/// and ask it before every statement.
///
/// An `async_trait`, so that adapters can hold `Arc<dyn Router>` as readily as a concrete type.
/// The scope is passed explicitly (usually [`current_scope()`](crate::current_scope)), which keeps
/// routers testable without a task-local.
///
/// A router that wraps another must forward every method, the provided ones included: a
/// wrapper that left [`tracks_reads`](Self::tracks_reads), [`record_read`](Self::record_read)
/// and [`end_request`](Self::end_request) to their defaults would silently turn the inner
/// router's monotonic reads off.
#[async_trait]
pub trait Router: Send + Sync {
    /// Where a read of `table` (or of several tables: `None`) goes for `scope`.
    ///
    /// Never fails: when the pin cannot be known (the cache is down), the answer is the leader.
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision;

    /// Where a write goes: the leader.
    fn route_write(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        let _ = (scope, table);
        metrics::counter!("distributed_writes_total").increment(1);
        Decision::leader(Reason::Write)
    }

    /// Records that `scope` wrote `table` and the write committed (at `position`, when the
    /// adapter knows it), so its next reads see it.
    ///
    /// # Errors
    /// When the pin could not be stored. The write itself has committed; the rest of this
    /// request reads the leader regardless, but a later request may not see the pin.
    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError>;

    /// The followers' health and lag, shared with adapters and the monitor.
    fn followers(&self) -> &FollowerSet;

    /// Whether reads must report what they saw through [`record_read`](Self::record_read):
    /// true for a router keeping monotonic reads. Adapters ask each server for its position
    /// after a read only when it is. Default false.
    fn tracks_reads(&self) -> bool {
        false
    }

    /// Records that a read of `table` by `scope`, routed by `decision`, returned nothing newer
    /// than `seen`: its server's WAL position taken on the same connection after the read
    /// (`pg_last_wal_replay_lsn()` on a follower, `pg_current_wal_insert_lsn()` on the leader),
    /// an upper bound of what the read could have returned. `None` when that position could
    /// not be had; the router must then stay safe without it.
    ///
    /// Adapters call it when a read connection is released, before the scope's next read is
    /// routed and before its request ends (see [`Scope::settle`]). The default does nothing.
    async fn record_read(
        &self,
        scope: &Scope,
        table: Option<&str>,
        decision: Decision,
        seen: Option<WalPosition>,
    ) {
        let _ = (scope, table, decision, seen);
    }

    /// Called once when `scope`'s request ends, after its reads were recorded: where a router
    /// stores what the whole request read, once. Adapters arrange the call (through
    /// [`with_scope`](crate::with_scope)); the default does nothing.
    async fn end_request(&self, scope: &Scope) {
        let _ = scope;
    }

    /// Gives `scope` a new key (`None`: no key), carrying its pins to it: those its old key
    /// holds from earlier requests and those of this request. A visitor who wrote before having
    /// a session, or a login that cycles the session id, keeps reading its own writes.
    ///
    /// The default only changes the key; routers that keep pins override it.
    ///
    /// # Errors
    /// When a pin could not be read or stored; the key is changed regardless, and the rest of
    /// this request still reads its own writes.
    async fn rekey(&self, scope: &Scope, key: Option<ScopeKey>) -> Result<(), CacheError> {
        scope.set_key(key);
        Ok(())
    }
}

#[async_trait]
impl<R: Router + ?Sized> Router for Arc<R> {
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        (**self).route_read(scope, table).await
    }
    fn route_write(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        (**self).route_write(scope, table)
    }
    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError> {
        (**self).record_write(scope, table, position).await
    }
    fn followers(&self) -> &FollowerSet {
        (**self).followers()
    }
    fn tracks_reads(&self) -> bool {
        (**self).tracks_reads()
    }
    async fn record_read(
        &self,
        scope: &Scope,
        table: Option<&str>,
        decision: Decision,
        seen: Option<WalPosition>,
    ) {
        (**self).record_read(scope, table, decision, seen).await;
    }
    async fn end_request(&self, scope: &Scope) {
        (**self).end_request(scope).await;
    }
    async fn rekey(&self, scope: &Scope, key: Option<ScopeKey>) -> Result<(), CacheError> {
        (**self).rekey(scope, key).await
    }
}

/// The router: writes to the leader; reads to a healthy follower unless the scope wrote
/// recently (as `R` says), the follower is down or lagging, or the cache cannot tell.
///
/// ```
/// use std::time::Duration;
/// use distributed_core::{Config, DistributedRouter, MemoryCache, Reason, Router, Scope,
///                        SessionCachedRouter, Target};
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let config = Config::builder()
///     .leader("leader", "postgres://leader/app")
///     .follower("near", "postgres://follower/app")
///     .lag_window(Duration::from_secs(2))
///     .build()?;
/// let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
/// let router = DistributedRouter::new(config, pins);
///
/// let alice = Scope::new("alice-session");
/// assert_eq!(router.route_read(Some(&alice), None).await.target, Target::Follower(0));
/// router.record_write(Some(&alice), Some("posts"), None).await?;
/// let after = router.route_read(Some(&alice), None).await;
/// assert_eq!((after.target, after.reason), (Target::Leader, Reason::RecentWrite));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct DistributedRouter<R, P = RandomPicker> {
    config: Config,
    recently: R,
    picker: P,
    followers: FollowerSet,
}

impl<R: RecentlyUpdated> DistributedRouter<R, RandomPicker> {
    /// A router over `config`, pinning through `recently`, picking followers at random.
    pub fn new(config: Config, recently: R) -> Self {
        Self::with_picker(config, recently, RandomPicker)
    }
}

impl<R: RecentlyUpdated, P: FollowerPicker> DistributedRouter<R, P> {
    /// A router that picks followers with `picker`.
    pub fn with_picker(config: Config, recently: R, picker: P) -> Self {
        let followers = FollowerSet::new(&config);
        Self {
            config,
            recently,
            picker,
            followers,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The pin store.
    pub fn recently(&self) -> &R {
        &self.recently
    }

    /// The picker.
    pub(crate) fn picker(&self) -> &P {
        &self.picker
    }

    /// The consistency token of `scope`: the strongest requirement of its reads, from this
    /// request's own writes and reads, the tokens it was given, and (asked at most once per
    /// request) the pin store. Put it in a response header or cookie, or in the payload of a
    /// job enqueued now, and read with [`Scope::from_token`] there.
    ///
    /// # Errors
    /// When the pin store could not answer; the token would not be trustworthy. (The request's
    /// own [`Scope::token`] is still a lower bound.)
    pub async fn token(&self, scope: &Scope) -> Result<ConsistencyToken, CacheError> {
        let need = self.need(scope, None).await?;
        Ok(scope.token().max(ConsistencyToken::new(need)))
    }

    /// The memo key of a read or write of `table`: the table in per-table mode, else the scope.
    pub(crate) fn memo_key<'t>(&self, table: Option<&'t str>) -> Option<&'t str> {
        if self.recently.per_table() {
            table
        } else {
            None
        }
    }

    /// How fresh reads of `table` must be for `scope`: what the pin store says (asked at most
    /// once per memo key per request) and what the scope's tokens require. `Err` means the
    /// store could not answer.
    pub(crate) async fn need(
        &self,
        scope: &Scope,
        table: Option<&str>,
    ) -> Result<Freshness, CacheError> {
        Ok(self.lookup(scope, table).await?.max(scope.floor()))
    }

    async fn lookup(&self, scope: &Scope, table: Option<&str>) -> Result<Freshness, CacheError> {
        let memo_key = self.memo_key(table);
        // What this request already learned (a lookup, or its own write) stands, unless the
        // cache failed since: then only a leader pin is still known to be enough.
        if let Some(known) = scope.memo(memo_key)
            && (known == Freshness::Leader || !scope.cache_failed())
        {
            return Ok(known);
        }
        if scope.cache_failed() {
            return Err(CacheError::Timeout(self.config.cache_timeout()));
        }
        let Some(key) = scope.key() else {
            // No key, no shared pin: only this request's own writes count.
            return Ok(scope.memo(memo_key).unwrap_or_default());
        };
        let subject = Subject {
            scope: &key,
            table: memo_key,
        };
        match self.with_timeout(self.recently.freshness(subject)).await {
            Ok(found) => {
                scope.raise(memo_key, found);
                Ok(scope.memo(memo_key).unwrap_or(found))
            }
            Err(e) => {
                scope.set_cache_failed();
                Err(e)
            }
        }
    }

    pub(crate) async fn with_timeout<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let timeout = self.config.cache_timeout();
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(CacheError::Timeout(timeout)))
    }

    fn decide(&self, need: Result<Freshness, CacheError>) -> Decision {
        let need = match need {
            Ok(Freshness::Leader) => return Decision::leader(Reason::RecentWrite),
            Ok(need) => need,
            Err(e) => {
                tracing::debug!(error = %e, "pin store unavailable; reading the leader");
                return Decision::leader(Reason::CacheUnavailable);
            }
        };
        let candidates = self.followers.candidates(need);
        if candidates.eligible.is_empty() {
            return Decision::leader(match need {
                Freshness::AtLeast(_) if candidates.any_up => Reason::RecentWrite,
                _ if candidates.any_up => Reason::FollowersLagging,
                _ => Reason::NoHealthyFollower,
            });
        }
        let reason = match need {
            Freshness::AtLeast(_) => Reason::CaughtUpFollower,
            _ => Reason::HealthyFollower,
        };
        Decision::follower(self.picker.pick(&candidates.eligible), reason)
    }
}

#[async_trait]
impl<R: RecentlyUpdated, P: FollowerPicker> Router for DistributedRouter<R, P> {
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        let decision = if is_leader_forced() {
            Decision::leader(Reason::Forced)
        } else if self.followers.is_empty() {
            Decision::leader(Reason::NoFollowers)
        } else {
            let need = match scope {
                Some(scope) => self.need(scope, table).await,
                None => Ok(Freshness::Any),
            };
            self.decide(need)
        };
        record_read(&self.followers, decision);
        decision
    }

    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError> {
        // Whatever the scope, the followers may not have this write until measured again.
        self.followers.note_write();
        let Some(scope) = scope else { return Ok(()) };
        metrics::counter!("distributed_marks_total").increment(1);
        let per_table = self.recently.per_table();
        // In per-table mode a write pins its table and the whole scope, so that a read naming
        // no table (a join, say) sees it too.
        let memo_keys: &[Option<&str>] = match (per_table, table) {
            (true, Some(_)) => &[table, None],
            _ => &[None],
        };
        // Until the pin store answers, the rest of this request reads the leader: that holds
        // even if the store is down, which is what keeps a failed mark safe within a request.
        let provisional = match position {
            Some(position) => Freshness::AtLeast(position),
            None => Freshness::Leader,
        };
        let Some(key) = scope.key() else {
            for memo_key in memo_keys {
                scope.raise(*memo_key, provisional);
            }
            return Ok(());
        };
        let mut result = Ok(());
        for memo_key in memo_keys {
            let subject = Subject {
                scope: &key,
                table: *memo_key,
            };
            match self
                .with_timeout(self.recently.mark_updated_at(subject, position))
                .await
            {
                Ok(freshness) => scope.raise(*memo_key, freshness),
                Err(e) => {
                    scope.raise(*memo_key, Freshness::Leader);
                    metrics::counter!("distributed_mark_failures_total").increment(1);
                    tracing::warn!(error = %e, "could not store a pin; this request reads the leader");
                    result = Err(e);
                }
            }
        }
        result
    }

    async fn rekey(&self, scope: &Scope, key: Option<ScopeKey>) -> Result<(), CacheError> {
        let mut result = Ok(());
        // The old key's pin from earlier requests (a login cycling the session id): learn it,
        // memoized, so it is carried with the rest. Not knowing it, pin the leader: safe.
        if let Some(old) = scope.key()
            && key.as_ref() != Some(&old)
            && let Err(e) = self.lookup(scope, None).await
        {
            scope.raise(None, Freshness::Leader);
            result = Err(e);
        }
        scope.set_key(key.clone());
        let Some(key) = key else { return result };
        for (table, freshness) in scope.pins() {
            let position = match freshness {
                Freshness::AtLeast(position) => Some(position),
                _ => None,
            };
            let subject = Subject {
                scope: &key,
                table: table.as_deref(),
            };
            if let Err(e) = self
                .with_timeout(self.recently.mark_updated_at(subject, position))
                .await
            {
                result = Err(e);
            }
        }
        result
    }

    fn followers(&self) -> &FollowerSet {
        &self.followers
    }
}

pub(crate) fn record_read(followers: &FollowerSet, decision: Decision) {
    let node = match decision.target {
        Target::Leader => "leader",
        Target::Follower(i) => followers.name(i),
    };
    tracing::debug!(target_kind = decision.target.kind(), node, reason = %decision.reason, "routed read");
    metrics::counter!(
        "distributed_reads_total",
        "target" => decision.target.kind(),
        "reason" => decision.reason.label()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::{Cache, MemoryCache, SessionCachedRouter, force_leader};

    /// A cache that counts calls and can be switched off or made slow.
    #[derive(Default)]
    struct FlakyCache {
        inner: MemoryCache,
        gets: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
        slow: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Cache for FlakyCache {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.check().await?;
            self.inner.get(key).await
        }
        async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
            self.check().await?;
            self.inner.set(key, value, ttl).await
        }
        async fn delete(&self, key: &str) -> Result<(), CacheError> {
            self.check().await?;
            self.inner.delete(key).await
        }
    }

    impl FlakyCache {
        async fn check(&self) -> Result<(), CacheError> {
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(CacheError::Unavailable("connection refused".into()));
            }
            Ok(())
        }
    }

    type TestRouter = DistributedRouter<SessionCachedRouter<Arc<FlakyCache>>>;

    fn router(followers: usize) -> (TestRouter, Arc<FlakyCache>) {
        let mut b = Config::builder()
            .leader("l", "l")
            .lag_window(Duration::from_secs(2));
        for i in 0..followers {
            b = b.follower(format!("f{i}"), format!("f{i}"));
        }
        let config = b.build().unwrap();
        let cache = Arc::new(FlakyCache::default());
        let pins = SessionCachedRouter::new(cache.clone(), config.lag_window());
        (DistributedRouter::new(config, pins), cache)
    }

    #[tokio::test]
    async fn writes_go_to_the_leader() {
        let (r, _) = router(2);
        assert_eq!(r.route_write(None, None), Decision::leader(Reason::Write));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_pins_the_scope_for_the_window_only() {
        let (r, _) = router(2);
        let first = Scope::new("a");
        r.record_write(Some(&first), None, None).await.unwrap();
        assert_eq!(
            r.route_read(Some(&first), None).await.reason,
            Reason::RecentWrite
        );
        // A later request of the same scope is still pinned, through the cache.
        let later = Scope::new("a");
        assert_eq!(
            r.route_read(Some(&later), None).await.reason,
            Reason::RecentWrite
        );
        // Another scope is not.
        let other = Scope::new("b");
        assert_eq!(
            r.route_read(Some(&other), None).await.reason,
            Reason::HealthyFollower
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let after = Scope::new("a");
        assert_eq!(
            r.route_read(Some(&after), None).await.reason,
            Reason::HealthyFollower
        );
    }

    #[tokio::test]
    async fn no_scope_and_no_followers() {
        let (r, _) = router(1);
        assert_eq!(
            r.route_read(None, None).await.reason,
            Reason::HealthyFollower
        );
        let (r, _) = router(0);
        assert_eq!(
            r.route_read(None, None).await,
            Decision::leader(Reason::NoFollowers)
        );
    }

    #[tokio::test]
    async fn anonymous_scopes_pin_only_their_own_request() {
        let (r, cache) = router(1);
        let visitor = Scope::anonymous();
        assert_eq!(
            r.route_read(Some(&visitor), None).await.reason,
            Reason::HealthyFollower
        );
        r.record_write(Some(&visitor), None, None).await.unwrap();
        assert_eq!(
            r.route_read(Some(&visitor), None).await.reason,
            Reason::RecentWrite
        );
        // Another anonymous visitor shares nothing with the first, and nothing was stored.
        let other = Scope::anonymous();
        assert_eq!(
            r.route_read(Some(&other), None).await.reason,
            Reason::HealthyFollower
        );
        assert!(cache.inner.is_empty());
    }

    #[tokio::test]
    async fn rekey_carries_the_pin_to_the_new_key() {
        let (r, _) = router(1);
        let visitor = Scope::anonymous();
        r.record_write(Some(&visitor), None, None).await.unwrap();
        r.rekey(&visitor, Some("new-session".into())).await.unwrap();
        let next_request = Scope::new("new-session");
        assert_eq!(
            r.route_read(Some(&next_request), None).await.reason,
            Reason::RecentWrite
        );
    }

    #[tokio::test]
    async fn rekey_at_login_carries_the_old_keys_pin_from_earlier_requests() {
        let (r, _) = router(1);
        r.record_write(Some(&Scope::new("old")), None, None)
            .await
            .unwrap();
        let login = Scope::new("old");
        r.rekey(&login, Some("new".into())).await.unwrap();
        let next = Scope::new("new");
        assert_eq!(
            r.route_read(Some(&next), None).await.reason,
            Reason::RecentWrite
        );
        // An unpinned old key carries nothing.
        let login = Scope::new("quiet");
        r.rekey(&login, Some("quiet-new".into())).await.unwrap();
        let next = Scope::new("quiet-new");
        assert_eq!(
            r.route_read(Some(&next), None).await.reason,
            Reason::HealthyFollower
        );
    }

    #[tokio::test]
    async fn rekey_with_the_cache_down_pins_the_rest_of_the_request() {
        let (r, cache) = router(1);
        cache.down.store(true, Ordering::SeqCst);
        let login = Scope::new("old");
        assert!(r.rekey(&login, Some("new".into())).await.is_err());
        assert_eq!(login.key(), Some("new".into()));
        assert_eq!(
            r.route_read(Some(&login), None).await.reason,
            Reason::RecentWrite
        );
    }

    #[tokio::test]
    async fn one_lookup_per_request_however_many_reads() {
        let (r, cache) = router(2);
        let s = Scope::new("a");
        for _ in 0..10 {
            r.route_read(Some(&s), Some("t")).await;
            r.route_read(Some(&s), None).await;
        }
        assert_eq!(cache.gets.load(Ordering::SeqCst), 1);
        r.record_write(Some(&s), None, None).await.unwrap();
        assert_eq!(
            r.route_read(Some(&s), None).await.reason,
            Reason::RecentWrite
        );
        assert_eq!(cache.gets.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn cache_down_fails_safe_to_the_leader_without_error() {
        let (r, cache) = router(2);
        cache.down.store(true, Ordering::SeqCst);
        let s = Scope::new("a");
        assert_eq!(
            r.route_read(Some(&s), None).await,
            Decision::leader(Reason::CacheUnavailable)
        );
        // The rest of the request does not ask a dead cache again.
        assert_eq!(
            r.route_read(Some(&s), None).await.reason,
            Reason::CacheUnavailable
        );
        assert_eq!(cache.gets.load(Ordering::SeqCst), 1);
        // A failed mark reports the error and still pins the rest of the request.
        let w = Scope::new("w");
        assert!(r.record_write(Some(&w), None, None).await.is_err());
        assert_eq!(
            r.route_read(Some(&w), None).await.reason,
            Reason::RecentWrite
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_cache_times_out_to_the_leader() {
        let (r, cache) = router(1);
        cache.slow.store(true, Ordering::SeqCst);
        let s = Scope::new("a");
        let started = tokio::time::Instant::now();
        assert_eq!(
            r.route_read(Some(&s), None).await.reason,
            Reason::CacheUnavailable
        );
        assert_eq!(started.elapsed(), r.config().cache_timeout());
    }

    #[tokio::test]
    async fn forced_reads_go_to_the_leader() {
        let (r, _) = router(1);
        let d = force_leader(r.route_read(None, None)).await;
        assert_eq!(d, Decision::leader(Reason::Forced));
    }

    #[tokio::test]
    async fn unhealthy_and_lagging_followers() {
        let (r, _) = router(2);
        r.followers().mark_down(0);
        for _ in 0..20 {
            assert_eq!(r.route_read(None, None).await.target, Target::Follower(1));
        }
        r.followers()
            .record(1, Duration::from_secs(5), WalPosition(1));
        assert_eq!(
            r.route_read(None, None).await,
            Decision::leader(Reason::FollowersLagging)
        );
        r.followers().mark_down(1);
        assert_eq!(
            r.route_read(None, None).await,
            Decision::leader(Reason::NoHealthyFollower)
        );
    }

    #[tokio::test]
    async fn per_table_pins_cover_their_table_and_unnamed_reads() {
        let config = Config::builder()
            .leader("l", "l")
            .follower("f", "f")
            .build()
            .unwrap();
        let pins =
            SessionCachedRouter::new(MemoryCache::new(), config.lag_window()).per_table(true);
        let r = DistributedRouter::new(config, pins);
        r.record_write(Some(&Scope::new("a")), Some("posts"), None)
            .await
            .unwrap();
        let s = Scope::new("a");
        assert_eq!(
            r.route_read(Some(&s), Some("posts")).await.reason,
            Reason::RecentWrite
        );
        assert_eq!(
            r.route_read(Some(&s), None).await.reason,
            Reason::RecentWrite
        );
        assert_eq!(
            r.route_read(Some(&s), Some("users")).await.reason,
            Reason::HealthyFollower
        );
    }

    #[tokio::test]
    async fn tokens_carry_a_scope_to_a_job() {
        let (r, _) = router(1);
        let s = Scope::new("a");
        assert_eq!(r.token(&s).await.unwrap(), ConsistencyToken::default());
        r.record_write(Some(&Scope::new("a")), None, None)
            .await
            .unwrap();
        // A later request of the same scope learns of the pin from the cache.
        let later = Scope::new("a");
        let token = r.token(&later).await.unwrap();
        assert_eq!(token, ConsistencyToken::leader());
        let job = Scope::from_token(&token);
        assert_eq!(
            r.route_read(Some(&job), None).await,
            Decision::leader(Reason::RecentWrite)
        );
        // A position token sends the job to a follower that has it, and only then.
        let job = Scope::from_token(&ConsistencyToken::at_least(WalPosition(10)));
        assert_eq!(
            r.route_read(Some(&job), Some("t")).await,
            Decision::leader(Reason::RecentWrite)
        );
        r.followers().observe_replayed(0, WalPosition(10));
        assert_eq!(
            r.route_read(Some(&job), Some("t")).await,
            Decision::follower(0, Reason::CaughtUpFollower)
        );
    }

    #[tokio::test]
    async fn works_behind_dyn() {
        let (r, _) = router(1);
        let r: Arc<dyn Router> = Arc::new(r);
        let s = Scope::new("a");
        r.record_write(Some(&s), None, None).await.unwrap();
        assert_eq!(
            r.route_read(Some(&s), None).await.reason,
            Reason::RecentWrite
        );
    }
}
