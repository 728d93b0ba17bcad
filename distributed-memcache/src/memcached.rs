//! memcached, through `r2d2_memcache` or one shared `memcache::Client` per server.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use distributed_core::{Cache, CacheError, redact_url};
use memcache::{ClientError, CommandError, MemcacheError, ServerError, Url};
use r2d2_memcache::MemcacheConnectionManager;

use crate::key::{KeyMapper, MappedKey};
use crate::{DEFAULT_MAX_VALUE_SIZE, Error};

/// Which memcached client a [`MemcacheCache`] talks through.
///
/// Both keep a pool of sockets per server and both are driven from blocking threads; they differ
/// in how a call gets a socket. The default is [`Shared`](Self::Shared): the benchmark in
/// `BENCHMARKS.md` ("Cache backends") found neither clearly faster, and the shared client fails
/// and recovers within its configured timeouts (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MemcacheClient {
    /// One `memcache::Client` per server, shared by every call, holding a pool of
    /// [`pool_size`](MemcacheCacheBuilder::pool_size) sockets that this crate configures.
    #[default]
    Shared,
    /// An `r2d2::Pool` of `r2d2_memcache` connections per server (each connection a
    /// `memcache::Client` with one socket and a pool of its own, which `r2d2_memcache` builds
    /// with a 30 s connection timeout that this crate cannot shorten).
    R2d2,
}

/// Builds a [`MemcacheCache`]; see [`MemcacheCache::builder`].
#[derive(Clone)]
pub struct MemcacheCacheBuilder {
    servers: Vec<String>,
    namespace: String,
    settings: Settings,
    timeout: Option<Duration>,
}

impl fmt::Debug for MemcacheCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("MemcacheCacheBuilder")
            .field("servers", &servers)
            .field("namespace", &self.namespace)
            .field("settings", &self.settings)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    io_timeout: Duration,
    timeout: Duration,
    pool_size: u32,
    max_value_size: usize,
    client: MemcacheClient,
}

impl MemcacheCacheBuilder {
    /// How long a call waits for a socket by default (connecting, or for a free pooled one).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(50);
    /// How long a socket read or write may block by default.
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_millis(50);
    /// Sockets per server by default.
    pub const DEFAULT_POOL_SIZE: u32 = 16;

    fn new() -> Self {
        Self {
            servers: Vec::new(),
            namespace: KeyMapper::DEFAULT_NAMESPACE.to_owned(),
            settings: Settings {
                connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
                io_timeout: Self::DEFAULT_IO_TIMEOUT,
                timeout: Duration::ZERO,
                pool_size: Self::DEFAULT_POOL_SIZE,
                max_value_size: DEFAULT_MAX_VALUE_SIZE,
                client: MemcacheClient::default(),
            },
            timeout: None,
        }
    }

    /// Adds a server: `host:port`, or a `memcache://host:port` URL (its query options are kept;
    /// `protocol=binary` picks memcached's binary protocol instead of the text protocol used by
    /// default). Keys are spread over the servers in the order given: every app server must
    /// list the same servers in the same order.
    #[must_use]
    pub fn server(mut self, address: impl Into<String>) -> Self {
        self.servers.push(address.into());
        self
    }

    /// Adds several servers; see [`server`](Self::server).
    #[must_use]
    pub fn servers<S: Into<String>>(mut self, addresses: impl IntoIterator<Item = S>) -> Self {
        self.servers.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// The prefix of every key (default `distributed:`); see [`KeyMapper`].
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a call waits for a socket: a free pooled one, or a new connection
    /// (default [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT)).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// How long one socket read or write may block (default
    /// [`DEFAULT_IO_TIMEOUT`](Self::DEFAULT_IO_TIMEOUT)). memcache applies one value to both:
    /// its per-direction setters only reach sockets open at the time they are called, so a
    /// socket opened after a reconnect would have none; the URL option this sets reaches every
    /// socket.
    #[must_use]
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.settings.io_timeout = timeout;
        self
    }

    /// The most a call may take as its caller sees it, whatever happens on the blocking thread
    /// (default: connect timeout plus I/O timeout, 100 ms with the defaults).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sockets per server (default [`DEFAULT_POOL_SIZE`](Self::DEFAULT_POOL_SIZE)); also the
    /// most calls a server serves at once.
    #[must_use]
    pub fn pool_size(mut self, size: u32) -> Self {
        self.settings.pool_size = size;
        self
    }

    /// The largest value stored; a larger one is [`CacheError::ValueTooLarge`] before any
    /// network call (default [`DEFAULT_MAX_VALUE_SIZE`](crate::DEFAULT_MAX_VALUE_SIZE), which a
    /// memcached started with its default `-I 1m` accepts). Raise it only with the servers' `-I`.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.settings.max_value_size = bytes;
        self
    }

    /// Which client to talk through (default [`MemcacheClient::Shared`]).
    #[must_use]
    pub fn client(mut self, client: MemcacheClient) -> Self {
        self.settings.client = client;
        self
    }

    /// The cache. Connects lazily: building succeeds while the servers are down, and calls fail
    /// with [`CacheError::Unavailable`] until they are up.
    ///
    /// # Errors
    /// When no server is given, an address or the namespace is invalid, or a timeout or the pool
    /// size is zero.
    pub fn build(self) -> Result<MemcacheCache, Error> {
        let mut settings = self.settings;
        if settings.connect_timeout.is_zero() || settings.io_timeout.is_zero() {
            return Err(Error::InvalidSetting("timeouts must be longer than zero"));
        }
        settings.timeout = self
            .timeout
            .unwrap_or(settings.connect_timeout + settings.io_timeout);
        if settings.timeout.is_zero() {
            return Err(Error::InvalidSetting("timeouts must be longer than zero"));
        }
        if settings.pool_size == 0 {
            return Err(Error::InvalidSetting("the pool size must be at least 1"));
        }
        if self.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let keys = KeyMapper::new(self.namespace)?;
        let servers = self
            .servers
            .iter()
            .map(|address| Server::new(address, &settings))
            .collect::<Result<_, _>>()?;
        Ok(MemcacheCache {
            inner: Arc::new(Inner {
                keys,
                servers,
                settings,
            }),
        })
    }
}

/// A [`Cache`] on one or more memcached servers.
///
/// Keys go through a [`KeyMapper`] (any text becomes a valid key under the namespace) and are
/// spread over the servers by its stable hash. Every call runs on Tokio's blocking threads
/// (`spawn_blocking`), never on the async workers, and returns within
/// [`timeout`](MemcacheCacheBuilder::timeout): a down server is [`CacheError::Unavailable`], a
/// slow one [`CacheError::Timeout`]. A socket that failed mid-call may hold a late answer that
/// the next call would read as its own, so on such a failure the server's whole pool is
/// replaced; calls after the server is back reconnect by themselves.
///
/// Times to live are whole seconds in memcached, counted on a clock that ticks once a second:
/// an item stored for `n` seconds can vanish up to a second early. So a TTL is rounded up to
/// whole seconds and one second is added (a pin must never expire before its lag window; it may
/// outlive it by up to two seconds). A sub-second TTL thus never becomes `0`, which memcached
/// reads as "forever"; a TTL of zero deletes the key; a TTL beyond memcached's 30-day limit for
/// relative times is sent as an absolute Unix time, as memcached expects.
///
/// Cloning is cheap and shares the pools.
#[derive(Clone)]
pub struct MemcacheCache {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeyMapper,
    servers: Vec<Server>,
    settings: Settings,
}

impl fmt::Debug for MemcacheCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<&str> = self.servers().collect();
        f.debug_struct("MemcacheCache")
            .field("servers", &servers)
            .field("namespace", &self.inner.keys.namespace())
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl MemcacheCache {
    /// A builder with short default timeouts; add at least one server.
    ///
    /// ```
    /// use std::time::Duration;
    /// use distributed_memcache::{MemcacheCache, MemcacheClient};
    ///
    /// let cache = MemcacheCache::builder()
    ///     .servers(["10.0.0.1:11211", "10.0.0.2:11211"])
    ///     .namespace("myapp:")
    ///     .io_timeout(Duration::from_millis(80))
    ///     .client(MemcacheClient::R2d2)
    ///     .build()?;
    /// assert_eq!(cache.servers().count(), 2);
    /// # Ok::<(), distributed_memcache::Error>(())
    /// ```
    pub fn builder() -> MemcacheCacheBuilder {
        MemcacheCacheBuilder::new()
    }

    /// A cache on the single server at `address`, with the defaults.
    ///
    /// # Errors
    /// When the address is invalid.
    pub fn new(address: impl Into<String>) -> Result<Self, Error> {
        Self::builder().server(address).build()
    }

    /// The servers, in placement order, passwords redacted.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.inner.servers.iter().map(|s| s.shown.as_str())
    }

    /// The key mapping.
    pub fn key_mapper(&self) -> &KeyMapper {
        &self.inner.keys
    }

    /// Which client it talks through.
    pub fn client(&self) -> MemcacheClient {
        self.inner.settings.client
    }

    /// The largest value it stores.
    pub fn max_value_size(&self) -> usize {
        self.inner.settings.max_value_size
    }

    /// The most a call takes as its caller sees it.
    pub fn timeout(&self) -> Duration {
        self.inner.settings.timeout
    }

    /// Runs `op` on the server holding `key`, on a blocking thread, within the timeout.
    async fn run<T, F>(&self, key: &str, value_len: usize, op: F) -> Result<T, CacheError>
    where
        T: Send + 'static,
        F: FnOnce(&memcache::Client, &str) -> Result<T, MemcacheError> + Send + 'static,
    {
        let mapped = self.inner.keys.mapped(key);
        let inner = Arc::clone(&self.inner);
        let timeout = inner.settings.timeout;
        let call = tokio::task::spawn_blocking(move || inner.call(&mapped, value_len, op));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(CacheError::Backend(Box::new(join))),
            // The blocking call goes on until its own socket timeouts end it; nobody waits.
            Err(_elapsed) => Err(CacheError::Timeout(timeout)),
        }
    }
}

#[async_trait]
impl Cache for MemcacheCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.run(key, 0, |client, key| client.get::<Vec<u8>>(key))
            .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let limit = self.inner.settings.max_value_size;
        if value.len() > limit {
            return Err(CacheError::ValueTooLarge {
                size: value.len(),
                limit,
            });
        }
        let Some(expiration) = expiration(ttl, SystemTime::now()) else {
            // memcached has no "expire now": 0 means forever. A zero TTL stores nothing.
            return self.delete(key).await;
        };
        let value = value.to_vec();
        self.run(key, value.len(), move |client, key| {
            client.set(key, value.as_slice(), expiration)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.run(key, 0, |client, key| match client.delete(key) {
            Ok(_) | Err(MemcacheError::CommandError(CommandError::KeyNotFound)) => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }
}

/// Longest relative expiration memcached accepts; larger numbers are absolute Unix times.
const MAX_RELATIVE_EXPIRATION: u64 = 60 * 60 * 24 * 30;

/// The memcached expiration for `ttl`, or `None` for a zero TTL (delete instead).
///
/// Rounded up to whole seconds, plus one for memcached's once-a-second clock (see
/// [`MemcacheCache`]); past 30 days, an absolute Unix time.
fn expiration(ttl: Duration, now: SystemTime) -> Option<u32> {
    if ttl.is_zero() {
        return None;
    }
    let seconds = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .saturating_add(1);
    if seconds <= MAX_RELATIVE_EXPIRATION {
        return u32::try_from(seconds).ok();
    }
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Some(u32::try_from(now.saturating_add(seconds)).unwrap_or(u32::MAX))
}

/// The connections to one server; replaced whole when one of its sockets broke.
struct Generation {
    connections: Connections,
    /// Set when replaced: a call that finds it set after checking a connection out leaves it.
    retired: AtomicBool,
}

impl Generation {
    fn new(connections: Connections) -> Arc<Self> {
        Arc::new(Self {
            connections,
            retired: AtomicBool::new(false),
        })
    }
}

enum Connections {
    Shared(memcache::Client),
    R2d2(r2d2::Pool<MemcacheConnectionManager>),
}

struct Server {
    url: Url,
    shown: String,
    current: RwLock<Arc<Generation>>,
}

impl Server {
    fn new(address: &str, settings: &Settings) -> Result<Self, Error> {
        let shown = redact_url(address);
        let invalid = |source: distributed_core::BoxError| Error::InvalidServer {
            address: shown.clone(),
            source,
        };
        let url = if address.contains("://") {
            Url::parse(address).map_err(|e| invalid(Box::new(e)))?
        } else {
            Url::parse(&format!("memcache://{address}")).map_err(|e| invalid(Box::new(e)))?
        };
        if !url.scheme().starts_with("memcache") {
            return Err(invalid("the scheme must be memcache://".into()));
        }
        if url.host_str().is_none_or(str::is_empty) || url.port().is_none() {
            return Err(invalid("a host and a port are needed".into()));
        }
        let mut url = url;
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "timeout")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        // The text protocol unless the URL asks otherwise: its answers name their key, which
        // memcache checks, so a late answer on a socket can never pass for another key's value;
        // and memcache writes it in far fewer syscalls than the binary one (see the benchmark).
        let protocol_given = kept.iter().any(|(k, _)| k == "protocol");
        let mut query = url.query_pairs_mut();
        query.clear().extend_pairs(kept);
        if !protocol_given {
            query.append_pair("protocol", "ascii");
        }
        query.append_pair("timeout", &settings.io_timeout.as_secs_f64().to_string());
        drop(query);
        let connections = connect(&url, settings).map_err(|e| invalid(Box::new(e)))?;
        let current = RwLock::new(Generation::new(connections));
        Ok(Self {
            url,
            shown,
            current,
        })
    }

    fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces `broken`'s generation with fresh connections, unless another call already did.
    fn retire(&self, broken: &Arc<Generation>, settings: &Settings) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        broken.retired.store(true, Ordering::Release);
        if Arc::ptr_eq(&current, broken) {
            match connect(&self.url, settings) {
                Ok(fresh) => *current = Generation::new(fresh),
                // Cannot happen with memcache 0.21; keeping the old pool beats failing calls.
                Err(e) => tracing::warn!(error = %e, "could not replace a broken memcached pool"),
            }
        }
    }
}

/// Pools that connect lazily (building never blocks or fails on a down server) and keep quiet
/// about failed connection attempts: callers get typed errors instead.
fn connect(url: &Url, settings: &Settings) -> Result<Connections, MemcacheError> {
    match settings.client {
        MemcacheClient::Shared => {
            // test_on_check_out (r2d2's default) stays on: memcache never reports a socket as
            // broken, so the `version` ping at checkout is what discards a dead one.
            let pool = r2d2::Pool::builder()
                .max_size(settings.pool_size)
                .min_idle(Some(0))
                .connection_timeout(settings.connect_timeout)
                .error_handler(Box::new(r2d2::NopErrorHandler))
                .build_unchecked(memcache::ConnectionManager::new(url.clone()));
            memcache::Client::with_pools(vec![pool]).map(Connections::Shared)
        }
        MemcacheClient::R2d2 => Ok(Connections::R2d2(
            r2d2::Pool::builder()
                .max_size(settings.pool_size)
                .min_idle(Some(0))
                .connection_timeout(settings.connect_timeout)
                // Each connection is a memcache::Client whose own one-socket pool tests the
                // socket at every checkout; testing here too would add two round trips.
                .test_on_check_out(false)
                .error_handler(Box::new(r2d2::NopErrorHandler))
                .build_unchecked(MemcacheConnectionManager::new(url.to_string())),
        )),
    }
}

impl Inner {
    /// One blocking call on the server that holds `key`.
    fn call<T>(
        &self,
        key: &MappedKey,
        value_len: usize,
        op: impl FnOnce(&memcache::Client, &str) -> Result<T, MemcacheError>,
    ) -> Result<T, CacheError> {
        let server = &self.servers[key.server(self.servers.len())];
        let mut generation = server.current();
        let result = match &generation.connections {
            Connections::Shared(client) => op(client, &key.text),
            Connections::R2d2(pool) => {
                let mut client = pool
                    .get_timeout(self.settings.connect_timeout)
                    .map_err(|e| CacheError::Unavailable(Box::new(e)))?;
                if generation.retired.load(Ordering::Acquire) {
                    // Retired while this call waited: the connection may be the broken one.
                    drop(client);
                    generation = server.current();
                    let Connections::R2d2(pool) = &generation.connections else {
                        return Err(CacheError::Unavailable("memcached pool replaced".into()));
                    };
                    client = pool
                        .get_timeout(self.settings.connect_timeout)
                        .map_err(|e| CacheError::Unavailable(Box::new(e)))?;
                }
                let result = op(&client, &key.text);
                // Retire before the connection goes back, so that whoever is handed it next
                // sees the flag and leaves it.
                if result.as_ref().is_err_and(breaks_socket) {
                    server.retire(&generation, &self.settings);
                }
                drop(client);
                result
            }
        };
        result.map_err(|e| {
            if breaks_socket(&e) {
                server.retire(&generation, &self.settings);
            }
            self.cache_error(e, value_len)
        })
    }

    fn cache_error(&self, e: MemcacheError, value_len: usize) -> CacheError {
        let too_large = || CacheError::ValueTooLarge {
            size: value_len,
            limit: self.settings.max_value_size,
        };
        match e {
            MemcacheError::IOError(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                CacheError::Timeout(self.settings.io_timeout)
            }
            MemcacheError::IOError(_) | MemcacheError::PoolError(_) => {
                CacheError::Unavailable(Box::new(e))
            }
            MemcacheError::CommandError(CommandError::ValueTooLarge) => too_large(),
            MemcacheError::ServerError(ServerError::Error(ref message))
                if message.contains("too large") =>
            {
                too_large()
            }
            MemcacheError::ClientError(ClientError::Error(ref message))
                if message.contains("too large") =>
            {
                too_large()
            }
            other => CacheError::Backend(Box::new(other)),
        }
    }
}

/// Whether a failure may have left the socket out of step with the server (half a request
/// written, an answer still to come), so that the next call on it could read a stale answer.
fn breaks_socket(e: &MemcacheError) -> bool {
    !matches!(
        e,
        MemcacheError::PoolError(_)
            | MemcacheError::CommandError(_)
            | MemcacheError::ClientError(ClientError::KeyTooLong)
            | MemcacheError::BadURL(_)
    )
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_never_rounds_down_to_forever() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(expiration(Duration::ZERO, now), None);
        assert_eq!(expiration(Duration::from_nanos(1), now), Some(2));
        assert_eq!(expiration(Duration::from_millis(100), now), Some(2));
        assert_eq!(expiration(Duration::from_secs(1), now), Some(2));
        assert_eq!(expiration(Duration::from_millis(1_500), now), Some(3));
        assert_eq!(expiration(Duration::from_secs(2), now), Some(3));
    }

    #[test]
    fn long_ttls_become_absolute_times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let month = Duration::from_secs(MAX_RELATIVE_EXPIRATION);
        assert_eq!(
            expiration(month - Duration::from_secs(1), now),
            Some(2_592_000)
        );
        assert_eq!(expiration(month, now), Some(1_700_000_000 + 2_592_001));
        assert_eq!(expiration(Duration::MAX, now), Some(u32::MAX));
    }

    #[test]
    fn builder_validates() {
        assert!(matches!(
            MemcacheCache::builder().build(),
            Err(Error::NoServers)
        ));
        for bad in ["", "127.0.0.1", "http://127.0.0.1:11211", "memcache://:1"] {
            assert!(
                matches!(MemcacheCache::new(bad), Err(Error::InvalidServer { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            MemcacheCache::builder()
                .server("127.0.0.1:1")
                .io_timeout(Duration::ZERO)
                .build(),
            Err(Error::InvalidSetting(_))
        ));
        assert!(matches!(
            MemcacheCache::builder()
                .server("127.0.0.1:1")
                .pool_size(0)
                .build(),
            Err(Error::InvalidSetting(_))
        ));
        assert!(matches!(
            MemcacheCache::builder()
                .server("127.0.0.1:1")
                .namespace("a b")
                .build(),
            Err(Error::InvalidNamespace(_))
        ));
    }

    #[test]
    fn debug_and_errors_hide_passwords() {
        let cache = MemcacheCache::new("memcache://user:hunter2@127.0.0.1:11211").unwrap();
        assert!(!format!("{cache:?}").contains("hunter2"));
        let builder = MemcacheCache::builder().server("memcache://user:hunter2@bad");
        assert!(!format!("{builder:?}").contains("hunter2"));
        let error = builder.build().unwrap_err();
        assert!(!format!("{error:?} {error}").contains("hunter2"));
    }

    #[test]
    fn speaks_the_text_protocol_unless_told_otherwise() {
        let cache = MemcacheCache::new("127.0.0.1:11211").unwrap();
        let url = cache.inner.servers[0].url.to_string();
        assert_eq!(
            url,
            "memcache://127.0.0.1:11211?protocol=ascii&timeout=0.05"
        );
        let cache = MemcacheCache::new("memcache://127.0.0.1:11211?protocol=binary").unwrap();
        let url = cache.inner.servers[0].url.to_string();
        assert_eq!(
            url,
            "memcache://127.0.0.1:11211?protocol=binary&timeout=0.05"
        );
    }

    #[test]
    fn keeps_url_options_and_sets_the_socket_timeout() {
        let cache = MemcacheCache::builder()
            .server("memcache://127.0.0.1:11211?protocol=ascii&timeout=30")
            .io_timeout(Duration::from_millis(75))
            .build()
            .unwrap();
        let url = cache.inner.servers[0].url.to_string();
        assert_eq!(
            url,
            "memcache://127.0.0.1:11211?protocol=ascii&timeout=0.075"
        );
    }

    #[tokio::test]
    async fn oversized_values_fail_before_any_network_call() {
        // Nothing listens on port 1: a network call would be Unavailable, not ValueTooLarge.
        for client in [MemcacheClient::Shared, MemcacheClient::R2d2] {
            let cache = MemcacheCache::builder()
                .server("127.0.0.1:1")
                .max_value_size(10)
                .client(client)
                .build()
                .unwrap();
            let error = cache
                .set("k", &[0; 11], Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    error,
                    CacheError::ValueTooLarge {
                        size: 11,
                        limit: 10
                    }
                ),
                "{error:?}"
            );
        }
    }

    /// A memcached speaking just enough of either protocol: `version`, and `get` answered with
    /// the key it was asked for as the value; the first `get` is answered late.
    async fn late_answering_server(binary: bool) -> std::net::SocketAddr {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_get = Arc::new(AtomicBool::new(true));
        let late = |first_get: &AtomicBool| {
            let wait = first_get.swap(false, Ordering::SeqCst);
            async move {
                if wait {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let first_get = Arc::clone(&first_get);
                tokio::spawn(async move {
                    let mut socket = BufReader::new(socket);
                    loop {
                        let reply = if binary {
                            let mut header = [0_u8; 24];
                            if socket.read_exact(&mut header).await.is_err() {
                                return;
                            }
                            let opcode = header[1];
                            let key_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
                            let extras_len = usize::from(header[4]);
                            let body_len =
                                u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
                            let mut body = vec![0; body_len as usize];
                            if socket.read_exact(&mut body).await.is_err() {
                                return;
                            }
                            let (extras, value): (&[u8], Vec<u8>) = if opcode == 0x00 {
                                late(&first_get).await;
                                (&[0; 4], body[extras_len..extras_len + key_len].to_vec())
                            } else {
                                (&[], b"1.6.0".to_vec())
                            };
                            let mut reply = vec![0x81, opcode, 0, 0, extras.len() as u8, 0, 0, 0];
                            let body_len = (extras.len() + value.len()) as u32;
                            reply.extend_from_slice(&body_len.to_be_bytes());
                            reply.extend_from_slice(&[0; 12]);
                            reply.extend_from_slice(extras);
                            reply.extend_from_slice(&value);
                            reply
                        } else {
                            let mut line = String::new();
                            if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            match line.trim_end().split_once(' ') {
                                Some(("get", key)) => {
                                    late(&first_get).await;
                                    format!("VALUE {key} 0 {}\r\n{key}\r\nEND\r\n", key.len())
                                        .into_bytes()
                                }
                                _ => b"VERSION 1.6.0\r\n".to_vec(),
                            }
                        };
                        if socket.get_mut().write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_answer_is_never_read_as_another_keys() {
        for client in [MemcacheClient::Shared, MemcacheClient::R2d2] {
            for binary in [false, true] {
                let addr = late_answering_server(binary).await;
                let protocol = if binary { "binary" } else { "ascii" };
                let cache = MemcacheCache::builder()
                    .server(format!("memcache://{addr}?protocol={protocol}"))
                    .pool_size(1)
                    .client(client)
                    .build()
                    .unwrap();
                let keys = cache.key_mapper().clone();
                let late = cache.get("a").await.unwrap_err();
                assert!(late.is_unavailable(), "{client:?} {protocol}: {late:?}");
                // Let the late answer arrive on the socket.
                tokio::time::sleep(Duration::from_millis(400)).await;
                let mut served = 0;
                for key in ["b", "c", "d", "e"] {
                    match cache.get(key).await {
                        Ok(value) => {
                            let expected = Some(keys.map(key).into_bytes());
                            assert_eq!(value, expected, "{client:?} {protocol}");
                            served += 1;
                        }
                        Err(e) => assert!(e.is_unavailable(), "{client:?} {protocol}: {e:?}"),
                    }
                }
                assert!(served > 0, "{client:?} {protocol}: never recovered");
            }
        }
    }

    #[tokio::test]
    async fn a_down_server_is_unavailable_within_the_timeout() {
        for client in [MemcacheClient::Shared, MemcacheClient::R2d2] {
            let cache = MemcacheCache::builder()
                .server("127.0.0.1:1")
                .client(client)
                .build()
                .unwrap();
            let started = std::time::Instant::now();
            let error = cache.get("k").await.unwrap_err();
            assert!(error.is_unavailable(), "{error:?}");
            assert!(started.elapsed() < cache.timeout() + Duration::from_secs(1));
        }
    }
}
