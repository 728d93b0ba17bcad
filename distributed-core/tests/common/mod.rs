//! What the property tests share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{Cache, CacheError, MemoryCache};

/// A memory cache whose lookups can be made to fail; writes always land. (A failed pin write
/// is the one case a cache-kept pin cannot survive, and is documented as such; a failed lookup
/// must send the read to the leader.)
#[derive(Default)]
pub(crate) struct FlakyLookups {
    inner: MemoryCache,
    failing: AtomicBool,
}

impl FlakyLookups {
    /// Makes lookups fail (`true`) or work (`false`).
    pub(crate) fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Whether lookups fail.
    #[allow(dead_code)] // one of the two test binaries asks
    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Cache for FlakyLookups {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        if self.is_failing() {
            return Err(CacheError::Unavailable("injected".into()));
        }
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.inner.delete(key).await
    }
}
