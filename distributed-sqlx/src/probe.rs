//! The two queries of the health and lag monitor and of causal mode's on-demand check.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use distributed_core::{BoxError, Config, NodeProbe, ServerProbe, WalPosition};

use crate::Error;
use crate::pool::PgBackend;

/// Asks the servers where they are in the leader's log: `pg_current_wal_lsn()` on the leader,
/// `pg_last_wal_replay_lsn()` on a follower. The health and lag monitor runs these
/// ([`spawn_monitor`](distributed_core::spawn_monitor)); so does causal mode's on-demand check
/// ([`CausalRouter::attach_probe`](distributed_core::CausalRouter::attach_probe)).
///
/// Each server is asked through a pool of its own (one connection, opened when first needed),
/// so that a busy read pool never makes a healthy follower look dead. A
/// [`DistributedPool`](crate::DistributedPool) hands out the probe its monitor uses with
/// [`probe`](crate::DistributedPool::probe); [`PgProbe::new`] builds another.
pub struct PgProbe(Arc<ServerProbe<PgBackend>>);

impl fmt::Debug for PgProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // sqlx's connect options would show passwords.
        f.debug_struct("PgProbe")
            .field("followers", &self.0.followers())
            .field("timeout", &self.0.timeout())
            .finish_non_exhaustive()
    }
}

impl PgProbe {
    /// A probe of the servers of `config`; each query is bounded by the configured probe
    /// interval, or 1 s if that is shorter. Connects only when asked.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when a server's URL does not parse.
    pub fn new(config: &Config) -> Result<Self, Error> {
        let backend = PgBackend::parse(config)?;
        Ok(Self(Arc::new(ServerProbe::new(&backend, config))))
    }

    /// The probe a pool's monitor runs.
    pub(crate) fn from_core(probe: Arc<ServerProbe<PgBackend>>) -> Self {
        Self(probe)
    }
}

#[async_trait]
impl NodeProbe for PgProbe {
    async fn leader_position(&self) -> Result<WalPosition, BoxError> {
        self.0.leader_position().await
    }

    async fn follower_position(&self, index: usize) -> Result<WalPosition, BoxError> {
        self.0.follower_position(index).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_is_built_without_connecting_and_never_shows_a_password() {
        let config = Config::builder()
            .leader("leader", "postgres://app:hunter2@127.0.0.1:1/app")
            .follower("f", "postgres://app:hunter2@127.0.0.1:2/app")
            .build()
            .unwrap();
        let probe = PgProbe::new(&config).unwrap();
        let shown = format!("{probe:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(probe.follower_position(1).await.is_err(), "no follower 1");
        let bad = Config::builder()
            .leader("leader", "postgres://h:notaport/db")
            .build()
            .unwrap();
        assert!(matches!(
            PgProbe::new(&bad),
            Err(Error::InvalidUrl { node, .. }) if node == "leader"
        ));
    }
}
