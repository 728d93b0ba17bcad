//! The routing conformance suite: the tests every database adapter of the workspace passes
//! against real servers, written once.
//!
//! An adapter implements [`Adapter`] (a handful of one-line operations over its pool) in its
//! `tests/conformance.rs` and calls each test body of this crate from a `#[tokio::test]`:
//!
//! ```no_run
//! # use distributed_conformance::{Adapter, Mode};
//! # async fn run<MyAdapter: Adapter>() {
//! distributed_conformance::read_your_writes::<MyAdapter>(Mode::Time).await;
//! distributed_conformance::read_your_writes::<MyAdapter>(Mode::Causal).await;
//! # }
//! ```
//!
//! The router under test is a [`TestRouter`] of a [`Mode`]: time mode (a write pins the scope
//! to the leader for the lag window) or causal mode (the pool reports each write's WAL
//! position, and the scope's reads go to any follower that has replayed it). Most bodies test
//! one mode; [`read_your_writes`] runs in either.
//!
//! The bodies get their servers from `distributed-testkit`: the shared topology for the tests
//! that leave it as they found it (each with tables and scope keys of its own), one private
//! topology for the one that pauses and crashes servers. Without a rig they skip, unless
//! `DISTRIBUTED_REQUIRE_RIG` is set.
//!
//! A failed check panics, as a test does: this crate exists only to be called from tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod causal;
mod router;
mod short_window;
mod suite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{Config, Decision, FollowerSet, NodeProbe};

pub use causal::{
    a_token_in_a_job_payload_reads_the_write, followers_are_checked_on_demand,
    reads_return_to_caught_up_followers,
};
pub use distributed_core::SwitchableCache;
pub use router::{Mode, TestRouter};
pub use short_window::a_window_shorter_than_the_lag_reads_no_stale_row;
pub use suite::{
    cache_down_at_mark_time, monotonic_reads_lagging_and_crashes, read_your_writes,
    reads_return_to_followers_after_the_window, reports_commit_positions,
    starts_with_unreachable_servers, write_through_a_read_handle_fails,
};

/// How a test wants the pool set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Connections per server and role.
    pub max_connections: u32,
    /// How long a write waits for the leader before failing.
    pub leader_timeout: Duration,
    /// How long a read waits for a follower before trying the next server.
    pub follower_timeout: Duration,
    /// Whether writes report the leader's WAL position to the router (always, in causal
    /// mode).
    pub track_commit_position: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_connections: 8,
            leader_timeout: Duration::from_secs(2),
            follower_timeout: Duration::from_millis(500),
            track_commit_position: false,
        }
    }
}

/// What a test saw: the value read (if the row was there) and where the read went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// `Some(id)` when the row was found.
    pub value: Option<i64>,
    /// Where the read went and why.
    pub decision: Decision,
}

/// What the suite needs of an adapter: its pool, and one operation per way of reading and
/// writing, each in the current scope (`distributed_core::current_scope`). Tables have one
/// column, `id bigint primary key`.
#[async_trait]
pub trait Adapter: Sized + Send + Sync + 'static {
    /// The adapter's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Connects a pool over `config`, routed by `router`, with the health monitor running.
    async fn connect(
        config: Config,
        router: Arc<TestRouter>,
        settings: Settings,
    ) -> Result<Self, Self::Error>;

    /// The followers' health, as the pool's router sees it.
    fn followers(&self) -> &FollowerSet;

    /// The probe the pool's monitor uses (`DistributedPool::probe`), for causal mode's
    /// on-demand check.
    fn probe(&self) -> Arc<dyn NodeProbe>;

    /// Creates `table` on the leader (unrouted, unmarked).
    async fn create_table(&self, table: &str) -> Result<(), Self::Error>;

    /// Inserts `id` through the adapter's plain write path (which marks the scope).
    async fn write(&self, table: &str, id: i64) -> Result<(), Self::Error>;

    /// Inserts `id` in a transaction (which marks the scope when it commits).
    async fn write_in_transaction(&self, table: &str, id: i64) -> Result<(), Self::Error>;

    /// Looks `id` up through the routed read handle.
    async fn read(&self, table: &str, id: i64) -> Result<Observed, Self::Error>;

    /// Looks `id` up through the force-leader read handle.
    async fn read_leader(&self, table: &str, id: i64) -> Result<Observed, Self::Error>;

    /// Looks `id` up through the read path that retries on the next server when a follower
    /// fails under it.
    async fn read_with_failover(&self, table: &str, id: i64) -> Result<Observed, Self::Error>;

    /// Tries to insert `id` through a read handle (the force-leader one when `leader`); returns
    /// the decision of the handle when the insert (wrongly) succeeds.
    async fn write_through_read_handle(
        &self,
        table: &str,
        id: i64,
        leader: bool,
    ) -> Result<Decision, Self::Error>;

    /// Whether `error` is the adapter's typed "a write went through a read handle" error.
    fn is_read_only(error: &Self::Error) -> bool;

    /// Whether `error` is the adapter's typed "the leader is unavailable" error.
    fn is_leader_unavailable(error: &Self::Error) -> bool;
}
