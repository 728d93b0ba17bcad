//! The test rig of the workspace: a real PostgreSQL leader with lagging streaming followers,
//! memcached, Redis, and a TCP proxy that adds latency.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use distributed_testkit::{TopologyOptions, private_topology_or_skip, rig_or_skip};
//!
//! # async fn tests() -> Result<(), distributed_testkit::RigError> {
//! // Against the servers `cargo xtask integration-test` shares between all tests:
//! let Some(rig) = rig_or_skip("reads_lag_behind_writes") else {
//!     return Ok(());
//! };
//! println!("write to {}, read from {:?}", rig.leader_url(), rig.follower_urls());
//!
//! // A topology of the test's own, for tests that break things:
//! let opts = TopologyOptions {
//!     followers: 1,
//!     apply_delay: Duration::from_millis(500),
//!     ..TopologyOptions::default()
//! };
//! let Some(topology) = private_topology_or_skip("reads_survive_a_follower_crash", opts).await?
//! else {
//!     return Ok(());
//! };
//! topology.stop_follower(0).await?;
//! topology.start_follower(0).await?;
//! topology.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Where the servers come from
//!
//! [`Topology::start`] runs `initdb`, `pg_ctl` and `pg_basebackup` in a fresh directory (as the
//! `postgres` user when run as root, since PostgreSQL refuses root), on free loopback ports, and
//! stops everything when dropped. `cargo xtask integration-test` starts one topology for the whole
//! test run and describes it to the tests through the variables in [`mod@env`]; tests read it with
//! [`rig_or_skip`]. Without those variables the helpers skip, so `cargo test --workspace` passes
//! with no server installed; with [`env::REQUIRE_RIG`] set (the xtask sets it) they fail instead.
//!
//! # The rig directory
//!
//! ```text
//! $DISTRIBUTED_RIG_DIR/          (/tmp/distributed-rig-XXXXXX, owned by postgres when root)
//!   leader/                      data directory of the leader
//!   leader.log                   its server log
//!   follower-N/, follower-N.log  the same for follower N, from 0
//!   memcached.log, memcached.pid
//!   redis.log, redis.pid
//!   .s.PGSQL.PORT                the servers' unix sockets
//!   private/                     private topologies of the tests run by the xtask
//! ```

mod cache_server;
pub mod env;
mod error;
mod logs;
mod postgres;
mod process;
mod proxy;
mod topology;
mod url;

pub use cache_server::{CacheKind, StandaloneCache, memcached_program, redis_program};
pub use env::{
    EnvRig, RigHealth, memcached_or_skip, private_topology_or_skip, redis_or_skip, rig_or_skip,
};
pub use error::RigError;
pub use logs::LogCapture;
pub use postgres::postgres_bin_dir;
pub use proxy::DelayProxy;
pub use topology::{Topology, TopologyOptions};
