//! What building a cache backend can fail with. Calls on a built backend fail with the core
//! [`CacheError`](distributed_core::CacheError).

use distributed_core::BoxError;

/// What building a [`MemcacheCache`](crate::MemcacheCache) or `RedisCache` can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server was given.
    #[error("no cache server configured")]
    NoServers,
    /// A server address could not be understood. The address is shown with any password
    /// redacted.
    #[error("invalid cache server address {address}")]
    InvalidServer {
        /// The address, password redacted.
        address: String,
        /// Why it was refused.
        #[source]
        source: BoxError,
    },
    /// The namespace cannot start a valid memcached key.
    #[error("invalid cache namespace: {0}")]
    InvalidNamespace(&'static str),
    /// A setting is out of range (a zero timeout or pool size, say).
    #[error("invalid cache setting: {0}")]
    InvalidSetting(&'static str),
    /// The Redis backend was built outside a Tokio runtime; its connection manager needs one.
    #[error("RedisCache must be built inside a Tokio runtime")]
    NoRuntime,
}
