//! Shared cache backends for `distributed-core`: memcached and (feature `redis`) Redis.
//!
//! ```no_run
//! use std::time::Duration;
//! use distributed_core::{Config, DistributedRouter, Router, Scope, SessionCachedRouter};
//! use distributed_memcache::MemcacheCache;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .leader("sydney", "postgres://app:secret@leader.example/app")
//!     .follower("frankfurt", "postgres://app:secret@follower.example/app")
//!     .lag_window(Duration::from_secs(2))
//!     .build()?;
//! // Every app server lists the same memcached servers, in the same order.
//! let cache = MemcacheCache::builder()
//!     .servers(["10.0.0.5:11211", "10.0.0.6:11211"])
//!     .namespace("myapp:")
//!     .build()?;
//! let router = DistributedRouter::new(
//!     config.clone(),
//!     SessionCachedRouter::new(cache, config.lag_window()),
//! );
//!
//! let scope = Scope::new("session-abc");
//! router.record_write(Some(&scope), Some("posts"), None).await?;
//! // Any app server now sends this session's reads to the leader for the lag window; with
//! // memcached down, to the leader too (`Reason::CacheUnavailable`), never to a stale follower.
//! let decision = router.route_read(Some(&Scope::new("session-abc")), None).await;
//! # let _ = decision;
//! # Ok(())
//! # }
//! ```
//!
//! # What every backend guarantees
//!
//! - **Keys**: any text (spaces, control characters, unicode, kilobytes) is hashed by a
//!   [`KeyMapper`] into a valid key under a namespace; distinct keys never share a stored key
//!   and no input reaches another namespace.
//! - **Values** larger than the configured limit ([`DEFAULT_MAX_VALUE_SIZE`] by default) are
//!   [`CacheError::ValueTooLarge`](distributed_core::CacheError::ValueTooLarge) before any
//!   network call: never a silent truncation.
//! - **Failures are fast and typed**: a down server is `Unavailable`, a slow one `Timeout`,
//!   within the backend's timeout (100 ms by default, as the router's `cache_timeout`); the
//!   router then reads the leader. When the server is back the backend reconnects by itself.
//! - **Times to live** never expire early; see [`MemcacheCache`] for memcached's whole seconds.
//!
//! The same `conformance` suite (feature `conformance`) checks all of this against
//! `MemoryCache`, memcached and Redis.
//!
//! # Which memcached client
//!
//! [`MemcacheClient::Shared`] (the default) keeps one `memcache::Client` per server, with a pool
//! of sockets this crate configures; [`MemcacheClient::R2d2`] keeps an `r2d2::Pool` of
//! `r2d2_memcache` connections, each a `memcache::Client` with a one-socket pool of its own.
//! Both are blocking clients, so every call runs on Tokio's blocking threads
//! (`tokio::task::spawn_blocking`), never on the async worker threads. Both ping a socket
//! (`version`) before each use, since memcache cannot otherwise tell a dead socket from a live
//! one: two round trips per call.
//!
//! In the benchmark (`BENCHMARKS.md`, "Cache backends") neither was clearly faster: the shared
//! client's throughput was 0.85 to 1.25 times r2d2_memcache's, cell by cell, within the run's
//! noise. The shared client is the default for how it fails: `r2d2_memcache` builds its inner
//! pools with r2d2's 30-second connection timeout, which this crate cannot shorten, so with
//! memcached down or silent a blocking thread (and the pooled connection it holds) keeps
//! retrying for up to 30 s after its caller gave up, and a runtime shutting down waits for it;
//! the shared client's pool uses the configured connect timeout. After a restart, both served
//! again within a few hundred milliseconds in the tests.
//!
//! memcached's text protocol is the default (`?protocol=binary` in a server URL picks the binary
//! one): memcache sends the binary protocol one header field per syscall, which made it 0.5 to
//! 0.8 times as fast in the same benchmark, and only the text protocol's answers name their key,
//! which memcache checks, so a late answer left on a socket can never pass for another key's
//! value. (A socket that failed mid-call is never reused either way: the server's pool is
//! replaced.)
//!
//! Redis, through its async multiplexed connection, was 6 to 15 times the memcached paths'
//! throughput, with p50 latency 5 to 12 times lower: teams free to choose should prefer it.

mod error;
mod key;
mod memcached;
#[cfg(feature = "redis")]
mod redis_cache;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use error::Error;
pub use key::{KeyMapper, MAX_KEY_LEN, MAX_NAMESPACE_LEN};
pub use memcached::{MemcacheCache, MemcacheCacheBuilder, MemcacheClient};
#[cfg(feature = "redis")]
pub use redis_cache::{RedisCache, RedisCacheBuilder};

/// The drivers, re-exported so that users get the versions this crate was built with.
pub use memcache;
pub use r2d2_memcache;
#[cfg(feature = "redis")]
pub use redis;

/// The default largest value: memcached's default item size (1 MiB, `-I 1m`) less 1 KiB for the
/// key and the item header that count against the same limit.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1024 * 1024 - 1024;
