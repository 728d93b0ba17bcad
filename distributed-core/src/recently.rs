//! "Did this scope write recently?" — the original package's two extension points, as traits.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Cache, CacheError, Freshness, ScopeKey, WalPosition};

/// What a pin is about: a scope, and in per-table mode the table read or written.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The scope's key.
    pub scope: &'a ScopeKey,
    /// The table, when the caller named one. `None` means "the whole scope" (a read that
    /// joins several tables, or a caller that does not say).
    pub table: Option<&'a str>,
}

/// Whether a scope wrote recently enough that a follower may not have its write yet.
///
/// An `async_trait`, so that one implementation can be shared as `Arc<dyn RecentlyUpdated>`.
/// Implement the two required methods for a pin kept anywhere; or implement [`CachedRouter`],
/// which keeps pins in a [`Cache`] and gets this trait for free.
#[async_trait]
pub trait RecentlyUpdated: Send + Sync {
    /// Whether reads of `subject` must go to the leader now.
    async fn is_recently_updated(&self, subject: Subject<'_>) -> Result<bool, CacheError>;

    /// Records that `subject` has just written.
    async fn mark_updated(&self, subject: Subject<'_>) -> Result<(), CacheError>;

    /// Whether pins are kept per table. When true, a write to table `t` is recorded under
    /// `t` and under the whole scope, so a read naming no table still sees it.
    fn per_table(&self) -> bool {
        false
    }

    /// How fresh a read of `subject` must be. The default maps a recent write to
    /// [`Freshness::Leader`]; causal implementations answer with a WAL position instead.
    async fn freshness(&self, subject: Subject<'_>) -> Result<Freshness, CacheError> {
        Ok(if self.is_recently_updated(subject).await? {
            Freshness::Leader
        } else {
            Freshness::Any
        })
    }

    /// Records a write that committed at `position` (when the adapter knows it), and returns
    /// the freshness the rest of the request needs. The default ignores the position.
    async fn mark_updated_at(
        &self,
        subject: Subject<'_>,
        position: Option<WalPosition>,
    ) -> Result<Freshness, CacheError> {
        let _ = position;
        self.mark_updated(subject).await?;
        Ok(Freshness::Leader)
    }
}

/// A [`RecentlyUpdated`] that keeps each pin as a cache key living as long as the lag window.
///
/// Only the key's presence is read, never a stored time, so app servers with skewed clocks
/// agree. Every `CachedRouter` is a [`RecentlyUpdated`].
pub trait CachedRouter: Send + Sync {
    /// The cache the pins live in.
    type Cache: Cache + ?Sized;

    /// The cache the pins live in.
    fn cache(&self) -> &Self::Cache;

    /// How long a pin lives.
    fn lag_window(&self) -> Duration;

    /// The cache key for `subject`; `None` means "never pinned".
    fn cache_key(&self, subject: Subject<'_>) -> Option<String>;

    /// See [`RecentlyUpdated::per_table`].
    fn per_table(&self) -> bool {
        false
    }
}

/// The value stored under a pin key; only its presence matters.
const PIN_VALUE: &[u8] = b"1";

#[async_trait]
impl<T: CachedRouter> RecentlyUpdated for T {
    async fn is_recently_updated(&self, subject: Subject<'_>) -> Result<bool, CacheError> {
        match self.cache_key(subject) {
            Some(key) => Ok(self.cache().get(&key).await?.is_some()),
            None => Ok(false),
        }
    }

    async fn mark_updated(&self, subject: Subject<'_>) -> Result<(), CacheError> {
        match self.cache_key(subject) {
            Some(key) => self.cache().set(&key, PIN_VALUE, self.lag_window()).await,
            None => Ok(()),
        }
    }

    fn per_table(&self) -> bool {
        CachedRouter::per_table(self)
    }
}

/// The original's `SessionCachedRouter`: pins keyed by the scope's key (a session id, by
/// default), for the whole scope or, as an option, per table.
///
/// By default a write pins every read of the scope: a read that joins tables must not be
/// stale. [`per_table`](Self::per_table) narrows pins to the table written, for callers that
/// name tables on every read and write.
#[derive(Debug, Clone)]
pub struct SessionCachedRouter<C> {
    cache: C,
    lag_window: Duration,
    prefix: String,
    per_table: bool,
}

impl<C: Cache> SessionCachedRouter<C> {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "distributed:pin:";

    /// Pins in `cache`, each living `lag_window`.
    pub fn new(cache: C, lag_window: Duration) -> Self {
        Self {
            cache,
            lag_window,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            per_table: false,
        }
    }

    /// Keeps pins per table instead of per scope.
    #[must_use]
    pub fn per_table(mut self, per_table: bool) -> Self {
        self.per_table = per_table;
        self
    }

    /// Prefixes every key, to share a cache between applications.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

impl<C: Cache> CachedRouter for SessionCachedRouter<C> {
    type Cache = C;

    fn cache(&self) -> &C {
        &self.cache
    }

    fn lag_window(&self) -> Duration {
        self.lag_window
    }

    fn cache_key(&self, subject: Subject<'_>) -> Option<String> {
        let scope = subject.scope.as_str();
        // The scope's length goes first, so that no (scope, table) pair can spell another's key.
        Some(match (self.per_table, subject.table) {
            (true, Some(table)) => format!("{}t:{}:{scope}:{table}", self.prefix, scope.len()),
            _ => format!("{}s:{scope}", self.prefix),
        })
    }

    fn per_table(&self) -> bool {
        self.per_table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryCache;

    fn subject<'a>(scope: &'a ScopeKey, table: Option<&'a str>) -> Subject<'a> {
        Subject { scope, table }
    }

    #[tokio::test(start_paused = true)]
    async fn pin_lives_for_the_window() {
        let r = SessionCachedRouter::new(MemoryCache::new(), Duration::from_secs(2));
        let a = ScopeKey::from("a");
        assert!(!r.is_recently_updated(subject(&a, None)).await.unwrap());
        r.mark_updated(subject(&a, Some("posts"))).await.unwrap();
        assert!(
            r.is_recently_updated(subject(&a, Some("users")))
                .await
                .unwrap()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!r.is_recently_updated(subject(&a, None)).await.unwrap());
    }

    #[tokio::test]
    async fn scopes_do_not_share_pins() {
        let r = SessionCachedRouter::new(MemoryCache::new(), Duration::from_secs(2));
        let (a, b) = (ScopeKey::from("a"), ScopeKey::from("b"));
        r.mark_updated(subject(&a, None)).await.unwrap();
        assert!(!r.is_recently_updated(subject(&b, None)).await.unwrap());
    }

    #[tokio::test]
    async fn per_table_keys_are_unambiguous() {
        let r =
            SessionCachedRouter::new(MemoryCache::new(), Duration::from_secs(2)).per_table(true);
        let (ab, a) = (ScopeKey::from("a:b"), ScopeKey::from("a"));
        r.mark_updated(subject(&ab, Some("c"))).await.unwrap();
        assert!(
            r.is_recently_updated(subject(&ab, Some("c")))
                .await
                .unwrap()
        );
        assert!(
            !r.is_recently_updated(subject(&a, Some("b:c")))
                .await
                .unwrap()
        );
        assert!(
            !r.is_recently_updated(subject(&ab, Some("d")))
                .await
                .unwrap()
        );
    }
}
