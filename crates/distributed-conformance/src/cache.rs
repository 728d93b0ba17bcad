//! A pin cache a test can take down.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{Cache, CacheError, MemoryCache};

/// A [`MemoryCache`] that fails every call while switched off, as a memcached that went away.
#[derive(Debug, Default)]
pub struct SwitchableCache {
    inner: MemoryCache,
    down: AtomicBool,
    failed_sets: AtomicUsize,
}

impl SwitchableCache {
    /// A working, empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the cache down (`true`) or brings it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// How many `set`s (pins) failed because the cache was down.
    pub fn failed_sets(&self) -> usize {
        self.failed_sets.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), CacheError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(CacheError::Unavailable("switched off by the test".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Cache for SwitchableCache {
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
