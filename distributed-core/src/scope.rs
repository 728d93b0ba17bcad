//! The request scope: whose writes a read must see, found without threading it through
//! application code (the Rust answer to the original's thread-local request middleware).
//!
//! A [`Scope`] lives in a `tokio` task-local for the duration of a future ([`with_scope`]);
//! [`current_scope`] finds it from anywhere inside, across `.await`s. The scope also memoizes
//! what the router learned during the request, so that N reads cost at most one cache lookup,
//! and a write earlier in the same request pins the rest of it even when the scope has no key
//! yet (a visitor's first request) or the cache is down.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tokio::task::futures::TaskLocalFuture;

use crate::{ConsistencyToken, WalPosition};

tokio::task_local! {
    static CURRENT: Scope;
    static FORCE_LEADER: ();
}

/// The key a scope is pinned under: a session id, a user id, a tenant, whatever an application
/// chooses. Its `Debug` form is redacted, since a session id is a credential.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopeKey(Arc<str>);

impl ScopeKey {
    /// A key from any text.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The key itself. Do not log it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScopeKey(<redacted>)")
    }
}

impl From<&str> for ScopeKey {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

impl From<String> for ScopeKey {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

/// How fresh a read must be for a scope.
///
/// Ordered from weakest to strongest: `Any < AtLeast(_) < Leader`, and two `AtLeast`s by
/// position; [`Freshness::max`] combines two requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Freshness {
    /// Any healthy follower will do.
    #[default]
    Any,
    /// A follower that has replayed at least this position will do (causal mode).
    AtLeast(WalPosition),
    /// Only the leader will do (time mode, within the lag window).
    Leader,
}

/// A request's scope: an optional key and what the router has learned during the request.
///
/// Cheap to clone (an `Arc`); clones share the memo.
#[derive(Clone, Default)]
pub struct Scope {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    key: Option<ScopeKey>,
    /// Freshness per memo key: `None` for the whole scope, `Some(table)` in per-table mode.
    memo: HashMap<Option<String>, Freshness>,
    /// The cache failed once in this request: do not ask it again, read the leader.
    cache_failed: bool,
    /// What consistency tokens given to this scope require of every read, whatever the table.
    floor: Freshness,
    /// Causal mode: the read position this request last stored, per memo key.
    reads_stored: HashMap<Option<String>, WalPosition>,
    /// Causal mode: the follower this request first read from, kept while it is eligible.
    sticky: Option<usize>,
    /// Causal mode: whether this request already asked a follower for its position.
    probed: bool,
    /// Causal mode, monotonic reads: the newest position the scope is known to have read at,
    /// per memo key (looked up, or read in this request). Kept apart from the memo, so that a
    /// read held on the leader by what the scope read is told from one held by what it wrote.
    seen: HashMap<Option<String>, WalPosition>,
    /// Causal mode, monotonic reads: the newest position a forced read of this request saw,
    /// required of every later read whatever its table.
    seen_everywhere: Option<WalPosition>,
    /// Work a released read connection still does for this scope (asking its server where it
    /// is, storing that): awaited before the next routing decision and before the request
    /// ends.
    pending: Vec<JoinHandle<()>>,
    /// What runs once the request is done and its pending work settled: the router storing
    /// what the request read, once.
    at_end: Option<Finish>,
}

/// What a router does at the end of a scope's request.
pub(crate) type Finish =
    Box<dyn FnOnce(Scope) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Scope")
            .field("keyed", &state.key.is_some())
            .field("memo", &state.memo.len())
            .field("cache_failed", &state.cache_failed)
            .finish()
    }
}

impl Scope {
    /// A scope pinned under `key`.
    pub fn new(key: impl Into<ScopeKey>) -> Self {
        Self::with_key(Some(key.into()))
    }

    /// A scope with no key yet (an anonymous visitor): its writes pin the rest of its own
    /// request, and follow it to a key given later through the router's `rekey`.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// A scope with the given key, or none.
    pub fn with_key(key: Option<ScopeKey>) -> Self {
        let scope = Self::default();
        scope.lock().key = key;
        scope
    }

    /// The key, if it has one.
    pub fn key(&self) -> Option<ScopeKey> {
        self.lock().key.clone()
    }

    /// A scope with no key whose reads see at least what `token` requires: a background job,
    /// or another service, reading what the request that issued the token wrote.
    ///
    /// ```
    /// use distributed_core::{ConsistencyToken, Freshness, Scope, WalPosition};
    ///
    /// // In the request that wrote: `router.token(&scope)` or `scope.token()`, into the job.
    /// let payload = ConsistencyToken::at_least(WalPosition(0x5A0)).to_string();
    /// // In the job:
    /// let token: ConsistencyToken = payload.parse()?;
    /// let scope = Scope::from_token(&token);
    /// assert_eq!(scope.token().freshness(), Freshness::AtLeast(WalPosition(0x5A0)));
    /// # Ok::<(), distributed_core::TokenError>(())
    /// ```
    pub fn from_token(token: &ConsistencyToken) -> Self {
        Self::anonymous().with_token(token)
    }

    /// This scope, also requiring what `token` requires of every read (see
    /// [`add_token`](Self::add_token)).
    #[must_use]
    pub fn with_token(self, token: &ConsistencyToken) -> Self {
        self.add_token(token);
        self
    }

    /// Makes every later read of this scope (every clone of it) at least as fresh as `token`
    /// requires, whatever table it reads. Requirements only rise.
    pub fn add_token(&self, token: &ConsistencyToken) {
        let mut state = self.lock();
        state.floor = state.floor.max(token.freshness());
    }

    /// The strongest requirement this request knows of without asking the cache: its own
    /// writes, what it looked up, what it read (causal mode) and the tokens it was given.
    /// The router's `token` also asks the cache for earlier requests' writes.
    pub fn token(&self) -> ConsistencyToken {
        let state = self.lock();
        let seen = state.seen.values().copied().chain(state.seen_everywhere);
        let strongest = state
            .memo
            .values()
            .copied()
            .chain(seen.map(Freshness::AtLeast))
            .fold(state.floor, Freshness::max);
        ConsistencyToken::new(strongest)
    }

    /// Replaces the key. This alone does not carry pins to the new key; routers do that in
    /// their [`rekey`](crate::Router::rekey).
    pub fn set_key(&self, key: Option<ScopeKey>) {
        self.lock().key = key;
    }

    /// What this request already knows for `memo_key`.
    pub(crate) fn memo(&self, memo_key: Option<&str>) -> Option<Freshness> {
        let state = self.lock();
        state.memo.get(&memo_key.map(str::to_owned)).copied()
    }

    /// Raises the memo for `memo_key` to at least `freshness`.
    pub(crate) fn raise(&self, memo_key: Option<&str>, freshness: Freshness) {
        let mut state = self.lock();
        let slot = state.memo.entry(memo_key.map(str::to_owned)).or_default();
        *slot = (*slot).max(freshness);
    }

    /// Every memo entry stronger than [`Freshness::Any`].
    pub(crate) fn pins(&self) -> Vec<(Option<String>, Freshness)> {
        let state = self.lock();
        state
            .memo
            .iter()
            .filter(|(_, f)| **f > Freshness::Any)
            .map(|(k, f)| (k.clone(), *f))
            .collect()
    }

    /// What the tokens given to this scope require.
    pub(crate) fn floor(&self) -> Freshness {
        self.lock().floor
    }

    /// Causal mode: the newest position the scope is known to have read at, as far as reads
    /// of `memo_key` must respect it.
    pub(crate) fn seen(&self, memo_key: Option<&str>) -> Option<WalPosition> {
        let state = self.lock();
        let own = state.seen.get(&memo_key.map(str::to_owned)).copied();
        own.max(state.seen_everywhere)
    }

    /// Causal mode: raises what the scope is known to have read at, for `memo_key`.
    pub(crate) fn see(&self, memo_key: Option<&str>, position: WalPosition) {
        let mut state = self.lock();
        let slot = state.seen.entry(memo_key.map(str::to_owned)).or_default();
        *slot = (*slot).max(position);
    }

    /// Causal mode: raises what the scope is known to have read at, for every memo key.
    pub(crate) fn see_everywhere(&self, position: WalPosition) {
        let mut state = self.lock();
        state.seen_everywhere = state.seen_everywhere.max(Some(position));
    }

    /// Every position the scope is known to have read at, by memo key (what a forced read saw
    /// under `None`), for carrying to a new key.
    pub(crate) fn seen_entries(&self) -> Vec<(Option<String>, WalPosition)> {
        let state = self.lock();
        let mut entries: Vec<_> = state.seen.iter().map(|(k, p)| (k.clone(), *p)).collect();
        if let Some(everywhere) = state.seen_everywhere {
            match entries.iter_mut().find(|(k, _)| k.is_none()) {
                Some((_, position)) => *position = (*position).max(everywhere),
                None => entries.push((None, everywhere)),
            }
        }
        entries
    }

    /// Whether this request should store `position` as a read position for `memo_key`: true
    /// when it is newer than what the request stored for it before.
    pub(crate) fn claim_read_store(&self, memo_key: Option<&str>, position: WalPosition) -> bool {
        let mut state = self.lock();
        let stored = state.reads_stored.entry(memo_key.map(str::to_owned));
        match stored {
            std::collections::hash_map::Entry::Occupied(mut slot) if *slot.get() < position => {
                slot.insert(position);
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(position);
                true
            }
        }
    }

    pub(crate) fn sticky(&self) -> Option<usize> {
        self.lock().sticky
    }

    pub(crate) fn set_sticky(&self, index: usize) {
        self.lock().sticky.get_or_insert(index);
    }

    /// Whether this request may ask a follower for its position: true the first time only.
    pub(crate) fn claim_probe(&self) -> bool {
        !std::mem::replace(&mut self.lock().probed, true)
    }

    /// Hands this scope work that must finish before its next read is routed and before its
    /// request ends: recording what a released read connection saw.
    pub(crate) fn defer(&self, work: JoinHandle<()>) {
        let mut state = self.lock();
        state.pending.retain(|handle| !handle.is_finished());
        state.pending.push(work);
    }

    /// Waits for what this scope's released read connections still record (see
    /// [`with_scope`], which calls it when its future ends). Routers call it before deciding.
    pub async fn settle(&self) {
        loop {
            let pending = std::mem::take(&mut self.lock().pending);
            if pending.is_empty() {
                return;
            }
            for handle in pending {
                // A panicked recording task recorded nothing; the router already raised
                // what it could before spawning it.
                let _ = handle.await;
            }
        }
    }

    /// Runs `finish` once this scope's request is done (by [`with_scope`]), unless something
    /// was registered before.
    pub(crate) fn at_end(&self, finish: impl FnOnce() -> Finish) {
        let mut state = self.lock();
        if state.at_end.is_none() {
            state.at_end = Some(finish());
        }
    }

    /// Whether reads of this scope still record something, or a router waits for its end.
    fn has_work(&self) -> bool {
        let state = self.lock();
        !state.pending.is_empty() || state.at_end.is_some()
    }

    /// Settles, then runs what was the router registered (storing what the request read): for callers
    /// that run a scope's request without [`with_scope`].
    pub async fn finish(&self) {
        self.settle().await;
        let finish = self.lock().at_end.take();
        if let Some(finish) = finish {
            finish(self.clone()).await;
        }
    }

    pub(crate) fn cache_failed(&self) -> bool {
        self.lock().cache_failed
    }

    pub(crate) fn set_cache_failed(&self) {
        self.lock().cache_failed = true;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a single assignment or map operation: a panic elsewhere
        // cannot leave the state half-written, so a poisoned lock's data is still good.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `future` with `scope` as the [`current_scope`]; once it is done, waits for what its
/// released read connections still record (monotonic reads: where each server was after the
/// read), so a request's reads count before its response leaves.
///
/// ```
/// use distributed_core::{current_scope, with_scope, Scope};
/// # tokio_test_block_on(async {
/// let seen = with_scope(Scope::new("session-123"), async {
///     current_scope().and_then(|s| s.key()).map(|k| k.as_str().to_owned())
/// })
/// .await;
/// assert_eq!(seen.as_deref(), Some("session-123"));
/// assert!(current_scope().is_none());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub fn with_scope<F: Future>(scope: Scope, future: F) -> Scoped<F> {
    Scoped {
        inner: CURRENT.scope(scope.clone(), future),
        scope,
        output: None,
        finish: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`with_scope`]: `F` inside the scope, then [`Scope::finish`].
    pub struct Scoped<F: Future> {
        #[pin]
        inner: TaskLocalFuture<Scope, F>,
        scope: Scope,
        output: Option<F::Output>,
        finish: Option<futures_util::future::BoxFuture<'static, ()>>,
    }
}

impl<F: Future> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped")
            .field("scope", &self.scope)
            .field("done", &self.output.is_some())
            .finish_non_exhaustive()
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        if this.output.is_none() {
            match this.inner.as_mut().poll(cx) {
                // Most requests have nothing left to do: no allocation for them.
                Poll::Ready(output) if !this.scope.has_work() => return Poll::Ready(output),
                Poll::Ready(output) => {
                    *this.output = Some(output);
                    let scope = this.scope.clone();
                    *this.finish = Some(Box::pin(async move { scope.finish().await }));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if let Some(finish) = this.finish.as_mut() {
            if finish.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *this.finish = None;
        }
        match this.output.take() {
            Some(output) => Poll::Ready(output),
            // Polled again after it completed: as for any future, a caller's bug.
            None => Poll::Pending,
        }
    }
}

/// The scope of the running task, if it runs inside [`with_scope`].
///
/// Code outside any scope (a background job, say) has no pin and reads followers: give a job
/// a scope, or a consistency token, if it must see a particular write.
pub fn current_scope() -> Option<Scope> {
    CURRENT.try_with(Scope::clone).ok()
}

/// Runs `future` with every read sent to the leader, like Rails' `connected_to(role: :writing)`:
/// for code that must see the latest data whatever the scope.
pub fn force_leader<F: Future>(future: F) -> TaskLocalFuture<(), F> {
    FORCE_LEADER.scope((), future)
}

/// Whether the running task is inside a [`force_leader`] block.
pub fn is_leader_forced() -> bool {
    FORCE_LEADER.try_with(|()| ()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scope_is_visible_across_awaits_and_not_outside() {
        assert!(current_scope().is_none());
        with_scope(Scope::new("a"), async {
            tokio::task::yield_now().await;
            let key = current_scope().and_then(|s| s.key());
            assert_eq!(key, Some(ScopeKey::from("a")));
        })
        .await;
        assert!(current_scope().is_none());
    }

    #[tokio::test]
    async fn nested_scopes_shadow() {
        with_scope(Scope::new("outer"), async {
            with_scope(Scope::new("inner"), async {
                assert_eq!(current_scope().and_then(|s| s.key()), Some("inner".into()));
            })
            .await;
            assert_eq!(current_scope().and_then(|s| s.key()), Some("outer".into()));
        })
        .await;
    }

    #[tokio::test]
    async fn force_leader_is_scoped() {
        assert!(!is_leader_forced());
        force_leader(async { assert!(is_leader_forced()) }).await;
        assert!(!is_leader_forced());
    }

    #[test]
    fn memo_only_rises() {
        let s = Scope::anonymous();
        assert_eq!(s.memo(None), None);
        s.raise(None, Freshness::AtLeast(WalPosition(5)));
        s.raise(None, Freshness::AtLeast(WalPosition(3)));
        assert_eq!(s.memo(None), Some(Freshness::AtLeast(WalPosition(5))));
        s.raise(None, Freshness::Leader);
        s.raise(None, Freshness::Any);
        assert_eq!(s.memo(None), Some(Freshness::Leader));
        s.raise(Some("t"), Freshness::Any);
        assert_eq!(s.pins(), vec![(None, Freshness::Leader)]);
    }

    #[test]
    fn tokens_raise_the_floor_and_show_in_the_scope_token() {
        let s = Scope::from_token(&ConsistencyToken::at_least(WalPosition(7)));
        assert_eq!(s.key(), None);
        assert_eq!(s.floor(), Freshness::AtLeast(WalPosition(7)));
        s.add_token(&ConsistencyToken::at_least(WalPosition(3)));
        assert_eq!(s.floor(), Freshness::AtLeast(WalPosition(7)));
        s.raise(Some("t"), Freshness::AtLeast(WalPosition(9)));
        assert_eq!(s.token().freshness(), Freshness::AtLeast(WalPosition(9)));
        let keyed = Scope::new("k").with_token(&ConsistencyToken::leader());
        assert_eq!(keyed.token(), ConsistencyToken::leader());
        assert_eq!(Scope::anonymous().token().freshness(), Freshness::Any);
    }

    #[test]
    fn what_was_seen_only_rises_is_kept_apart_and_shows_in_the_token() {
        let s = Scope::new("a");
        assert_eq!(s.seen(None), None);
        s.see(Some("t"), WalPosition(5));
        s.see(Some("t"), WalPosition(3));
        assert_eq!(s.seen(Some("t")), Some(WalPosition(5)));
        assert_eq!(s.seen(None), None);
        assert_eq!(s.memo(Some("t")), None, "seeing is not a lookup");
        s.see_everywhere(WalPosition(4));
        assert_eq!(s.seen(None), Some(WalPosition(4)));
        assert_eq!(s.seen(Some("t")), Some(WalPosition(5)));
        s.see_everywhere(WalPosition(2));
        assert_eq!(s.seen(Some("u")), Some(WalPosition(4)));
        let mut entries = s.seen_entries();
        entries.sort();
        assert_eq!(
            entries,
            vec![
                (None, WalPosition(4)),
                (Some("t".to_owned()), WalPosition(5))
            ]
        );
        assert_eq!(s.token().freshness(), Freshness::AtLeast(WalPosition(5)));
        assert!(
            s.pins().is_empty(),
            "what was read is not carried as a write"
        );
    }

    #[test]
    fn once_per_request_claims() {
        let s = Scope::new("a");
        assert!(s.claim_probe());
        assert!(!s.claim_probe());
        assert!(s.claim_read_store(None, WalPosition(5)));
        assert!(!s.claim_read_store(None, WalPosition(5)));
        assert!(!s.claim_read_store(None, WalPosition(4)));
        assert!(
            s.claim_read_store(None, WalPosition(6)),
            "a newer position is stored again"
        );
        assert!(s.claim_read_store(Some("t"), WalPosition(1)));
        s.set_sticky(1);
        s.set_sticky(0);
        assert_eq!(s.sticky(), Some(1));
    }

    #[test]
    fn keys_are_redacted_in_debug() {
        let s = Scope::new("secret-session-id");
        let shown = format!("{s:?} {:?}", s.key());
        assert!(!shown.contains("secret"), "{shown}");
    }
}
