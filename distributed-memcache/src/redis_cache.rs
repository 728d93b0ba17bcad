//! Redis, through the `redis` crate's `ConnectionManager`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{Cache, CacheError, redact_url};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::key::KeyMapper;
use crate::{DEFAULT_MAX_VALUE_SIZE, Error};

/// Builds a [`RedisCache`]; see [`RedisCache::builder`].
#[derive(Clone)]
pub struct RedisCacheBuilder {
    url: String,
    namespace: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    timeout: Option<Duration>,
    max_value_size: usize,
}

impl fmt::Debug for RedisCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheBuilder")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("timeout", &self.timeout)
            .field("max_value_size", &self.max_value_size)
            .finish()
    }
}

impl RedisCacheBuilder {
    /// How long connecting may take by default.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(50);
    /// How long an answer may take by default.
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_millis(50);

    /// The prefix of every key (default `distributed:`); see [`KeyMapper`].
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long one connection attempt may take (default
    /// [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT)).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long Redis may take to answer a command (default
    /// [`DEFAULT_IO_TIMEOUT`](Self::DEFAULT_IO_TIMEOUT)).
    #[must_use]
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// The most a call may take, reconnecting included (default: connect timeout plus I/O
    /// timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The largest value stored; a larger one is [`CacheError::ValueTooLarge`] before any
    /// network call (default [`DEFAULT_MAX_VALUE_SIZE`], as for memcached).
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The cache. Connects lazily: building succeeds while Redis is down, and calls fail with
    /// [`CacheError::Unavailable`] until it is up.
    ///
    /// # Errors
    /// When the URL is invalid, a timeout is zero, or this runs outside a Tokio runtime (the
    /// connection manager spawns a task).
    pub fn build(self) -> Result<RedisCache, Error> {
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return Err(Error::InvalidSetting("timeouts must be longer than zero"));
        }
        let timeout = self
            .timeout
            .unwrap_or(self.connect_timeout + self.io_timeout);
        if timeout.is_zero() {
            return Err(Error::InvalidSetting("timeouts must be longer than zero"));
        }
        let keys = KeyMapper::new(self.namespace)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let shown = redact_url(&self.url);
        let client = redis::Client::open(self.url.as_str()).map_err(|e| Error::InvalidServer {
            address: shown.clone(),
            source: Box::new(e),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.io_timeout))
            // One attempt per reconnection, retried on the next call: a long backoff would keep
            // calls waiting on a dead server after it is back.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(self.connect_timeout);
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            Error::InvalidServer {
                address: shown.clone(),
                source: Box::new(e),
            }
        })?;
        Ok(RedisCache {
            manager,
            keys,
            shown,
            io_timeout: self.io_timeout,
            timeout,
            max_value_size: self.max_value_size,
        })
    }
}

/// A [`Cache`] on one Redis server, through one multiplexed connection that reconnects by
/// itself (`redis::aio::ConnectionManager`).
///
/// Keys go through the same [`KeyMapper`] as memcached's. Times to live are milliseconds
/// (`SET … PX`), a sub-millisecond one rounded up; a zero TTL deletes the key. A down server is
/// [`CacheError::Unavailable`], a slow one [`CacheError::Timeout`], within
/// [`timeout`](RedisCacheBuilder::timeout).
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisCache {
    manager: ConnectionManager,
    keys: KeyMapper,
    shown: String,
    io_timeout: Duration,
    timeout: Duration,
    max_value_size: usize,
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.shown)
            .field("namespace", &self.keys.namespace())
            .field("io_timeout", &self.io_timeout)
            .field("timeout", &self.timeout)
            .field("max_value_size", &self.max_value_size)
            .finish()
    }
}

impl RedisCache {
    /// A builder for the Redis at `url` (`redis://host:port/db`, `rediss://` needs a TLS
    /// feature of `redis`), with short default timeouts.
    ///
    /// ```
    /// use distributed_memcache::RedisCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), distributed_memcache::Error> {
    /// let cache = RedisCache::builder("redis://:secret@10.0.0.7:6379/0")
    ///     .namespace("myapp:")
    ///     .build()?;
    /// assert!(!format!("{cache:?}").contains("secret"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(url: impl Into<String>) -> RedisCacheBuilder {
        RedisCacheBuilder {
            url: url.into(),
            namespace: KeyMapper::DEFAULT_NAMESPACE.to_owned(),
            connect_timeout: RedisCacheBuilder::DEFAULT_CONNECT_TIMEOUT,
            io_timeout: RedisCacheBuilder::DEFAULT_IO_TIMEOUT,
            timeout: None,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        }
    }

    /// The key mapping.
    pub fn key_mapper(&self) -> &KeyMapper {
        &self.keys
    }

    /// The largest value it stores.
    pub fn max_value_size(&self) -> usize {
        self.max_value_size
    }

    /// The most a call takes as its caller sees it.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, CacheError> {
        let mut connection = self.manager.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.cache_error(e)),
            Err(_elapsed) => Err(CacheError::Timeout(self.timeout)),
        }
    }

    fn cache_error(&self, e: redis::RedisError) -> CacheError {
        if e.is_timeout() {
            CacheError::Timeout(self.io_timeout)
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            CacheError::Unavailable(Box::new(e))
        } else {
            CacheError::Backend(Box::new(e))
        }
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.keys.map(key));
        self.query(cmd).await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        if value.len() > self.max_value_size {
            return Err(CacheError::ValueTooLarge {
                size: value.len(),
                limit: self.max_value_size,
            });
        }
        if ttl.is_zero() {
            return self.delete(key).await;
        }
        let millis = ttl.as_nanos().div_ceil(1_000_000);
        let millis = u64::try_from(millis)
            .unwrap_or(u64::MAX)
            .min(i64::MAX as u64);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keys.map(key)).arg(value).arg("PX").arg(millis);
        self.query::<()>(cmd).await
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.keys.map(key));
        self.query::<u64>(cmd).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_a_runtime() {
        assert!(matches!(
            RedisCache::builder("redis://127.0.0.1:1").build(),
            Err(Error::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn validates() {
        assert!(matches!(
            RedisCache::builder("http://127.0.0.1:1").build(),
            Err(Error::InvalidServer { .. })
        ));
        assert!(matches!(
            RedisCache::builder("redis://127.0.0.1:1")
                .io_timeout(Duration::ZERO)
                .build(),
            Err(Error::InvalidSetting(_))
        ));
    }

    #[tokio::test]
    async fn fails_fast_and_typed_when_down() {
        let cache = RedisCache::builder("redis://127.0.0.1:1")
            .max_value_size(4)
            .build()
            .unwrap();
        let error = cache
            .set("k", b"12345", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(
            error,
            CacheError::ValueTooLarge { size: 5, limit: 4 }
        ));
        let started = std::time::Instant::now();
        let error = cache.get("k").await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        assert!(started.elapsed() < cache.timeout() + Duration::from_secs(1));
    }
}
