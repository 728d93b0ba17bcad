//! Read-your-writes routing for [sqlx](https://docs.rs/sqlx) PostgreSQL pools: one leader,
//! lagging streaming followers, and a [`Router`](distributed_core::Router) deciding which
//! serves each read.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use distributed_core::{Config, DistributedRouter, MemoryCache, Scope, SessionCachedRouter, with_scope};
//! use distributed_sqlx::{DistributedPool, sqlx};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .leader("sydney", "postgres://app:secret@leader.example/app")
//!     .follower("frankfurt", "postgres://app:secret@follower-eu.example/app")
//!     .lag_window(Duration::from_secs(2))
//!     .build()?;
//! let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
//! let router = DistributedRouter::new(config.clone(), pins);
//! let pool = DistributedPool::connect(config, router).await?;
//!
//! // What a request handler does, inside the scope a `ScopeLayer` opened for its session:
//! with_scope(Scope::new("session-abc"), async {
//!     // Writes go to the leader and pin the scope for the lag window...
//!     pool.execute(sqlx::query("insert into posts (title) values ($1)").bind("hello"))
//!         .await?;
//!     // ...so reading back at once sees the write, although the followers lag behind.
//!     let mut conn = pool.read().await?;
//!     let posts: i64 = sqlx::query_scalar("select count(*) from posts")
//!         .fetch_one(&mut *conn)
//!         .await?;
//!     println!("{posts} posts, read from the {}", conn.target().kind());
//!     Ok::<_, distributed_sqlx::Error>(())
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What the pool does for you
//!
//! - **Writes** ([`DistributedPool::execute`], [`write`](DistributedPool::write),
//!   [`begin`](DistributedPool::begin)) go to the leader; once they succeed (commit) the
//!   current scope is marked, and its reads go to the leader for the lag window.
//! - **Reads** ([`read`](DistributedPool::read), [`read_with`](DistributedPool::read_with)) go
//!   where the router says. Every read connection is read-only
//!   (`default_transaction_read_only=on`): a write sent through one fails with
//!   [`Error::ReadOnly`].
//! - **Follower failures** are invisible to readers: a follower that refuses or drops a
//!   connection is marked down and the read runs on the next server (the leader when every
//!   follower is down). A background monitor probes every server
//!   (`pg_current_wal_lsn()` / `pg_last_wal_replay_lsn()`), measures each follower's lag,
//!   skips followers further behind than
//!   [`Config::max_follower_lag`](distributed_core::Config::max_follower_lag), and re-admits
//!   followers that come back, with back-off, jitter and a gradual ramp.
//! - **A failed mark** (the pin cache is down when a write succeeds) does not fail the write:
//!   the router logs it and counts it (`distributed_mark_failures_total`), and the rest of the
//!   request reads the leader; later requests of the scope read the leader too, for as long as
//!   the cache cannot answer.
//! - **The leader down**: writes fail with [`Error::LeaderUnavailable`] within the
//!   [acquire timeout](Builder::acquire_timeout); reads that need no pin go on from the
//!   followers. At start-up an unreachable leader is the same error; an unreachable follower is
//!   logged (its URL without password) and starts marked down.
//!
//! # Causal mode
//!
//! With [`track_commit_position`](Builder::track_commit_position) the pool reports each
//! write's WAL position to the router. A [`CausalRouter`](distributed_core::CausalRouter) then
//! sends the scope's later reads to any follower that has replayed that position, usually long
//! before a time window would end; [`PgProbe`] lets it ask a follower on demand when the
//! monitor's last measurement is too old to tell:
//!
//! ```no_run
//! use distributed_core::{CausalRouter, CausalTracker, Config, MemoryCache};
//! use distributed_sqlx::DistributedPool;
//!
//! # async fn run(config: Config) -> Result<(), distributed_sqlx::Error> {
//! let tracker = CausalTracker::new(MemoryCache::new(), config.lag_window());
//! let pool = DistributedPool::builder(config.clone(), CausalRouter::new(config, tracker))
//!     .track_commit_position(true)
//!     .connect()
//!     .await?;
//! pool.router().attach_probe(pool.probe());
//! # Ok(()) }
//! ```
//!
//! Each statement the pool runs is inside a `tracing` span named `distributed_sqlx` with the
//! target kind, the server's configured name and the routing reason; metrics come from the
//! router (see `distributed_core`). Neither ever carries a scope key or a password.

mod error;
mod pool;
mod probe;
mod read;
mod transaction;

pub use distributed_core;
pub use error::Error;
pub use pool::{Builder, DistributedPool, Table};
pub use probe::PgProbe;
pub use read::ReadConnection;
pub use sqlx;
pub use transaction::Transaction;
