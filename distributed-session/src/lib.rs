//! A write-behind session store that never loses a session.
//!
//! ```no_run
//! # #[cfg(feature = "sqlx")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use distributed_core::MemoryCache;
//! use distributed_session::{PgSessions, SessionDatabase, SessionRecord, WriteBehindStore};
//!
//! // The leader: a session saved a moment ago may not be on any follower yet.
//! let leader = sqlx::PgPool::connect("postgres://app@leader.example/app").await?;
//! let db = PgSessions::new(leader);
//! db.migrate().await?; // CREATE TABLE IF NOT EXISTS distributed_sessions ...
//! // In production, a cache every app server shares: distributed_memcache::MemcacheCache.
//! let store = WriteBehindStore::builder(MemoryCache::new(), db).build()?;
//!
//! let mut session = SessionRecord::new(Duration::from_secs(14 * 86_400));
//! session.data.insert("cart".into(), serde_json::json!(["book"]));
//! store.create(&mut session).await?; // one cache round trip; the database write follows
//!
//! let loaded = store.load(&session.id).await?.expect("just saved");
//! assert_eq!(loaded.data["cart"][0], "book");
//!
//! let logged_in = store.cycle_id(&loaded).await?; // login: new id, old one deleted
//! assert!(store.load(&session.id).await?.is_none());
//! # let _ = logged_in;
//! store.shutdown().await?; // everything accepted is in the database
//! # Ok(())
//! # }
//! ```
//!
//! The original package's session engine wrote the cache, then the database from a
//! fire-and-forget thread: fast, but it lost writes on errors and at shutdown, piled up threads
//! under load, and could not give up. [`WriteBehindStore`] keeps the speed (a save costs one
//! cache round trip) and loses nothing:
//!
//! - **One writer, a bounded outbox.** Saves of the same session coalesce (the highest version
//!   wins); the writer writes batches, retries with exponential backoff and jitter while the
//!   database is down, and gives a change up only after
//!   [`give_up_after`](WriteBehindBuilder::give_up_after), loudly: the
//!   `distributed_session_dead_writes_total` metric, an error log and the
//!   [`on_dead_write`](WriteBehindBuilder::on_dead_write) hook. A full outbox makes saves wait,
//!   then write through; a save is never dropped.
//! - **A version guard.** Every save gets a version from a hybrid logical clock; the database
//!   writes a row only over a lower version, so a retried or slow batch never overwrites a newer
//!   save, from this server or another.
//! - **Final deletes.** [`delete`](WriteBehindStore::delete) cancels the pending write, removes
//!   the cache entry and writes a tombstone that nothing overwrites: replaying a cookie after
//!   logout finds no session, whatever was in flight.
//! - **Loads never ask a follower.** Outbox, cache, then the leader; the cache is refilled.
//! - **The cache may fail.** Saves write through, loads read the database, the user sees no
//!   error; entries that may have gone stale meanwhile are not served and are deleted once the
//!   cache answers again.
//! - [`flush`](WriteBehindStore::flush) and [`shutdown`](WriteBehindStore::shutdown) wait for
//!   every accepted save; a periodic task removes expired sessions.
//!
//! # In a tower / axum stack
//!
//! With the feature `tower-sessions`, the store is a `tower_sessions::SessionStore` (0.15), so
//! it goes under `SessionManagerLayer`. With the feature `tower`, `SessionScopeLayer` keys each
//! request's routing scope by its session cookie, and the store (given the router through
//! [`carry_pins`](WriteBehindBuilder::carry_pins)) moves the request's read-your-writes pin to
//! every new session id: a visitor's first request and a login keep reading their own writes.
//! That is the original's `SessionCachedRouter`, with no code in the application.
//!
//! ```no_run
//! # #[cfg(all(feature = "sqlx", feature = "tower", feature = "tower-sessions"))]
//! # async fn example(
//! #     router: std::sync::Arc<distributed_core::DistributedRouter<
//! #         distributed_core::SessionCachedRouter<distributed_core::MemoryCache>>>,
//! #     leader: sqlx::PgPool,
//! #     cache: distributed_core::MemoryCache,
//! #     app: tower::util::BoxCloneService<http::Request<String>, http::Response<String>,
//! #         std::convert::Infallible>,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use distributed_session::{PgSessions, SessionScopeLayer, WriteBehindStore};
//! use tower::ServiceBuilder;
//! use tower_sessions::SessionManagerLayer;
//!
//! let store = WriteBehindStore::builder(cache, PgSessions::new(leader))
//!     .carry_pins(router.clone()) // the app's DistributedRouter
//!     .build()?;
//! let service = ServiceBuilder::new()
//!     .layer(SessionScopeLayer::new()) // outside: the scope spans the session's save
//!     .layer(SessionManagerLayer::new(store.clone()))
//!     .service(app);
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `sqlx`: [`SessionDatabase`] for [`PgSessions`]`<sqlx::PgPool>`.
//! - `bb8`: [`SessionDatabase`] for [`PgSessions`]`<bb8::Pool<bb8_postgres::PostgresConnectionManager<NoTls>>>`.
//! - `tower-sessions`: `tower_sessions_core::SessionStore` and `ExpiredDeletion` for the store.
//! - `tower`: `SessionScopeLayer` (and `session_cookie`).
//!
//! # What is never logged
//!
//! Session ids and session data appear in no log, metric or error message: [`SessionId`] and
//! [`SessionRecord`] print redacted `Debug`, and every metric label is a fixed word. Only the
//! dead-write hook is handed the id, for the application to act on.

mod clock;
mod database;
mod error;
mod id;
mod outbox;
mod pin;
mod postgres;
mod record;
mod store;
#[cfg(feature = "tower-sessions")]
mod tower_store;

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "bb8")]
mod pg_bb8;
#[cfg(feature = "sqlx")]
mod pg_sqlx;

pub use database::{MemoryDatabase, SessionDatabase, SessionRow, StoredSession};
pub use error::SessionError;
pub use id::SessionId;
#[cfg(feature = "tower")]
pub use layer::{SessionCookie, SessionScopeLayer, SessionScopeService, session_cookie};
pub use pin::PinCarrier;
pub use postgres::{MIGRATION, PgSessions};
pub use record::{SessionData, SessionRecord};
pub use store::{
    DeadWrite, MAX_DURATION_SETTING, StoreStats, WriteBehindBuilder, WriteBehindStore,
};
