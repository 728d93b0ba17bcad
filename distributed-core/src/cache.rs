//! The shared cache that holds pins (and, in `distributed-session`, sessions).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

/// Boxed error cause kept by [`CacheError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a [`Cache`] backend can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The server could not be reached, or the connection failed mid-call.
    #[error("cache unavailable")]
    Unavailable(#[source] BoxError),
    /// The call took longer than the configured timeout.
    #[error("cache call timed out after {0:?}")]
    Timeout(Duration),
    /// The value is larger than the backend stores; nothing was written.
    #[error("value of {size} bytes is larger than the cache's limit of {limit} bytes")]
    ValueTooLarge {
        /// The value's size.
        size: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// The backend answered, but with something it should not have (a protocol error, say).
    #[error("cache backend error")]
    Backend(#[source] BoxError),
}

impl CacheError {
    /// Whether the cache could not be asked at all (down, slow, broken connection), as opposed
    /// to a refusal of this one call. Routing fails safe to the leader on either.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CacheError::Unavailable(_) | CacheError::Timeout(_))
    }
}

/// A shared key-value cache with time-to-live: bytes in, bytes out.
///
/// It is an `async_trait` so that it can live behind `Arc<dyn Cache>`: one backend is shared by
/// the router, the session store and whatever else an application keeps there. Keys are any
/// UTF-8 text; a backend with key rules of its own (memcached: 250 bytes, no spaces) maps them.
///
/// Every implementation passes the same conformance tests (see `distributed-memcache`).
#[async_trait]
pub trait Cache: Send + Sync {
    /// The value stored under `key`, unless it is missing or expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
    /// Stores `value` under `key` for `ttl`, replacing what was there.
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), CacheError>;
}

#[async_trait]
impl<C: Cache + ?Sized> Cache for Arc<C> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        (**self).get(key).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        (**self).set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        (**self).delete(key).await
    }
}

/// An in-process [`Cache`], for tests and single-server deployments.
///
/// It is not shared between app servers: with more than one, use memcached or Redis so that
/// every server sees every pin. Expired entries are dropped lazily and on every
/// [`MemoryCache::DEFAULT_CAPACITY`]-th insert. Time is `tokio::time`, so paused-time tests
/// can move it.
#[derive(Debug, Clone, Default)]
pub struct MemoryCache {
    entries: Arc<Mutex<Entries>>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, (Vec<u8>, Instant)>,
    inserts: usize,
}

impl MemoryCache {
    /// How many inserts pass between two sweeps of expired entries.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many entries (live or not yet swept) it holds.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether it holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the map half-written (every critical
        // section is a single map operation), so the data is still good.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let now = Instant::now();
        let mut entries = self.lock();
        match entries.map.get(key) {
            Some((value, expires)) if *expires > now => Ok(Some(value.clone())),
            Some(_) => {
                entries.map.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.inserts += 1;
        if entries.inserts.is_multiple_of(Self::DEFAULT_CAPACITY) {
            entries.map.retain(|_, (_, expires)| *expires > now);
        }
        let expires = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        entries
            .map
            .insert(key.to_owned(), (value.to_vec(), expires));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.lock().map.remove(key);
        Ok(())
    }
}

/// A cache that a test can take down: while switched off, every call fails with
/// [`CacheError::Unavailable`], as when memcached stops or the network to it fails. For testing
/// what an application does when its cache goes away (the router reads the leader; the session
/// store writes through). Clones share the switch and the counters.
///
/// ```
/// use distributed_core::{Cache, CacheError, SwitchableCache};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache: SwitchableCache = SwitchableCache::default(); // over a MemoryCache
/// cache.set_down(true);
/// assert!(matches!(cache.get("k").await, Err(CacheError::Unavailable(_))));
/// cache.set_down(false);
/// assert_eq!(cache.get("k").await.unwrap(), None);
/// assert_eq!(cache.calls(), 2);
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct SwitchableCache<C = MemoryCache> {
    inner: C,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    failed_sets: Arc<AtomicUsize>,
}

impl<C> SwitchableCache<C> {
    /// Wraps `inner`, switched on.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            down: Arc::default(),
            calls: Arc::default(),
            failed_sets: Arc::default(),
        }
    }

    /// Takes the cache down (`true`) or brings it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Whether it is down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// How many calls it has had, failed ones included.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// How many `set`s failed because it was down (pins or sessions not stored).
    pub fn failed_sets(&self) -> usize {
        self.failed_sets.load(Ordering::SeqCst)
    }

    /// The wrapped cache.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn check(&self) -> Result<(), CacheError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.is_down() {
            return Err(CacheError::Unavailable("switched off".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl<C: Cache> Cache for SwitchableCache<C> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.check()?;
        self.inner.get(key).await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        if let Err(e) = self.check() {
            self.failed_sets.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        self.inner.set(key, value, ttl).await
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.check()?;
        self.inner.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn get_set_delete_and_expiry() {
        let c = MemoryCache::new();
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set("k", b"v", Duration::from_secs(1)).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"v".to_vec()));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(c.get("k").await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set("k", b"v", Duration::from_secs(1)).await.unwrap();
        c.delete("k").await.unwrap();
        c.delete("missing").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_expired_entries() {
        let c = MemoryCache::new();
        for i in 0..MemoryCache::DEFAULT_CAPACITY - 1 {
            c.set(&i.to_string(), b"", Duration::from_millis(1))
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_millis(2)).await;
        c.set("last", b"", Duration::from_secs(1)).await.unwrap();
        assert_eq!(c.len(), 1);
    }

    #[tokio::test]
    async fn huge_ttl_does_not_panic() {
        let c = MemoryCache::new();
        c.set("k", b"v", Duration::MAX).await.unwrap();
        assert!(c.get("k").await.unwrap().is_some());
    }
}
