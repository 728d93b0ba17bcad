//! Read-your-writes routing for one database leader and its lagging followers.
//!
//! Writes go to the leader. Reads go to a healthy, nearby follower — unless the current
//! *scope* (a session, a user, whatever key the application chooses) wrote recently, in which
//! case they go to the leader, so nobody ever fails to see what they just wrote.
//!
//! This crate holds no database driver and no cache client: only the decision and the traits
//! that adapters plug into.
//!
//! - [`Router`] decides where a statement goes; [`DistributedRouter`] is the implementation,
//!   generic over a [`RecentlyUpdated`] (did this scope write recently?) and a
//!   [`FollowerPicker`].
//! - [`CachedRouter`] keeps pins in a shared [`Cache`] for the lag window;
//!   [`SessionCachedRouter`] keys them by the scope. [`MemoryCache`] is the in-process cache;
//!   `distributed-memcache` has memcached and Redis.
//! - [`Scope`], [`with_scope`], [`current_scope`] and (feature `tower`) [`ScopeLayer`] find the
//!   request's scope without threading it through application code; [`force_leader`] sends a
//!   block's reads to the leader.
//! - [`FollowerSet`], [`spawn_monitor`] and [`read_with_failover`] keep reads off followers
//!   that are down or too far behind.
//! - Causal mode: [`CausalTracker`] remembers the WAL position of each scope's last write
//!   instead of pinning it for a time window, so its reads go to any follower that has
//!   replayed that far; [`CausalRouter`] adds monotonic reads and an on-demand check of a
//!   follower's position. A [`ConsistencyToken`] (signed with a [`TokenSigner`]) carries a
//!   scope's requirement into a background job or another service.
//!
//! Failing safe is the rule: when the cache cannot say whether a scope is pinned, the read
//! goes to the leader ([`Reason::CacheUnavailable`]), never to a follower that may be stale.
//!
//! ```
//! use std::time::Duration;
//! use distributed_core::{
//!     current_scope, with_scope, Config, DistributedRouter, MemoryCache, Reason, Router, Scope,
//!     SessionCachedRouter, Target,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let config = Config::builder()
//!     .leader("sydney", "postgres://app:secret@leader.example/app")
//!     .follower("frankfurt", "postgres://app:secret@follower.example/app")
//!     .lag_window(Duration::from_secs(2))
//!     .build()?;
//! let router = DistributedRouter::new(
//!     config.clone(),
//!     SessionCachedRouter::new(MemoryCache::new(), config.lag_window()),
//! );
//!
//! // What a request handler does, through an adapter, inside the scope a layer opened:
//! with_scope(Scope::new("session-abc"), async {
//!     let scope = current_scope();
//!     assert_eq!(router.route_read(scope.as_ref(), None).await.target, Target::Follower(0));
//!     let write = router.route_write(scope.as_ref(), Some("posts"));
//!     assert_eq!(write.target, Target::Leader);
//!     router.record_write(scope.as_ref(), Some("posts"), None).await?;
//!     let read = router.route_read(scope.as_ref(), Some("posts")).await;
//!     assert_eq!((read.target, read.reason), (Target::Leader, Reason::RecentWrite));
//!     Ok::<(), distributed_core::CacheError>(())
//! })
//! .await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod cache;
mod causal;
mod config;
mod decision;
mod failover;
mod health;
#[cfg(feature = "tower")]
mod layer;
mod monitor;
mod pools;
mod recently;
mod router;
mod scope;
mod supervise;
mod token;
mod wal;

pub use cache::{BoxError, Cache, CacheError, MemoryCache, SwitchableCache};
pub use causal::{CausalRouter, CausalTracker};
pub use config::{
    Config, ConfigBuilder, ConfigError, MAX_LAG_WINDOW, MAX_TIMING, Node, redact_url,
};
pub use decision::{Decision, Reason, Target};
pub use failover::{READ_ONLY_SQLSTATE, is_unavailable_sqlstate, read_with_failover};
pub use health::{FollowerPicker, FollowerSet, RandomPicker, RoundRobinPicker};
#[cfg(feature = "tower")]
pub use layer::{ExtractScope, ScopeLayer, ScopeService};
pub use monitor::{MonitorHandle, NodeProbe, spawn_monitor};
pub use pools::{
    Backend, ConnectError, Failed, Marker, PoolSettings, PositionError, Routed, RoutedPools,
    ServerProbe,
};
pub use recently::{CachedRouter, RecentlyUpdated, SessionCachedRouter, Subject};
pub use router::{DistributedRouter, Router};
pub use scope::{
    Freshness, Scope, ScopeKey, Scoped, current_scope, force_leader, is_leader_forced, with_scope,
};
pub use supervise::spawn_supervised;
pub use token::{ConsistencyToken, MAX_TOKEN_LEN, TokenError, TokenSigner};
pub use wal::{ParseWalPositionError, WalPosition};
