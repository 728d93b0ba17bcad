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
//! db.migrate().await?;
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
pub use layer::{SessionScopeLayer, SessionScopeService, session_cookie};
pub use pin::PinCarrier;
pub use postgres::{MIGRATION, PgSessions};
pub use record::{SessionData, SessionRecord};
pub use store::{DeadWrite, StoreStats, WriteBehindBuilder, WriteBehindStore};
