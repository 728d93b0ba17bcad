//! Cache servers of a test's own, to stop and start without disturbing the shared rig.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use async_trait::async_trait;
use distributed_memcache::conformance::ServerControl;
use distributed_testkit::StandaloneCache;

pub use distributed_testkit::CacheKind as Kind;

/// A memcached or Redis of the test's own (the testkit's [`StandaloneCache`]), which the
/// conformance suite can stop and start; killed on drop.
#[derive(Debug)]
pub struct OwnServer(StandaloneCache);

impl OwnServer {
    /// Starts one on a free port.
    pub async fn start(kind: Kind) -> Self {
        match StandaloneCache::start(kind).await {
            Ok(server) => Self(server),
            Err(e) => panic!("starting {kind:?}: {e}"),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.0.addr().to_owned()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn redis_url(&self) -> String {
        self.0.redis_url()
    }
}

#[async_trait]
impl ServerControl for OwnServer {
    async fn stop(&self) {
        self.0.stop();
    }

    async fn start(&self) {
        if let Err(e) = self.0.restart().await {
            panic!("restarting: {e}");
        }
    }
}

/// Whether tests that start servers of their own should run: under the rig (the variables the
/// xtask sets), as the shared-server tests do.
pub fn own_servers_or_skip(test: &str, kind: Kind) -> bool {
    match kind {
        Kind::Memcached => distributed_testkit::memcached_or_skip(test).is_some(),
        Kind::Redis => distributed_testkit::redis_or_skip(test).is_some(),
    }
}

/// Timeouts for tests that check behaviour, not speed: tests run in parallel on two cores, and
/// the defaults (tens of milliseconds) would turn a scheduling stall into a failure.
pub const PATIENT: Duration = Duration::from_millis(500);

/// A prefix no other test run uses, for keys on a shared server.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{test}:{}:{nanos}:", std::process::id())
}
