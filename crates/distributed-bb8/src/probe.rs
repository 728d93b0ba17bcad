//! The two queries of the health and lag monitor and of causal mode's on-demand check.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{BoxError, Config, NodeProbe, WalPosition};

use crate::pool::{parse, pool};
use crate::{Error, Manager};

/// Asks the servers where they are in the leader's log: `pg_current_wal_lsn()` on the leader,
/// `pg_last_wal_replay_lsn()` on a follower. The health and lag monitor runs these
/// ([`spawn_monitor`](distributed_core::spawn_monitor)); so does causal mode's on-demand check
/// ([`CausalRouter::attach_probe`](distributed_core::CausalRouter::attach_probe)).
///
/// Each server is asked through a pool of its own (one connection, opened when first needed),
/// so that a busy read pool never makes a healthy follower look dead. A
/// [`DistributedPool`](crate::DistributedPool) hands out the probe its monitor uses with
/// [`probe`](crate::DistributedPool::probe); [`PgProbe::new`] builds another.
pub struct PgProbe {
    leader: bb8::Pool<Manager>,
    followers: Vec<bb8::Pool<Manager>>,
    timeout: Duration,
}

impl fmt::Debug for PgProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection configurations would show passwords.
        f.debug_struct("PgProbe")
            .field("followers", &self.followers.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PgProbe {
    /// A probe of the servers of `config`; each query (and connection attempt) is bounded by
    /// the configured probe interval, or 1 s if that is shorter. Connects only when asked.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when a server's URL does not parse.
    pub fn new(config: &Config) -> Result<Self, Error> {
        let timeout = Self::timeout(config);
        let followers = config
            .followers()
            .iter()
            .map(|node| parse(node, timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_configs(
            config,
            &parse(config.leader(), timeout)?,
            &followers,
        ))
    }

    /// A probe from connection configurations already parsed out of `config`.
    pub(crate) fn with_configs(
        config: &Config,
        leader: &tokio_postgres::Config,
        followers: &[tokio_postgres::Config],
    ) -> Self {
        let timeout = Self::timeout(config);
        let probe_pool = |c: &tokio_postgres::Config| pool(c.clone(), timeout, 1);
        Self {
            leader: probe_pool(leader),
            followers: followers.iter().map(probe_pool).collect(),
            timeout,
        }
    }

    fn timeout(config: &Config) -> Duration {
        config.probe_interval().max(Duration::from_secs(1))
    }
}

#[async_trait]
impl NodeProbe for PgProbe {
    async fn leader_position(&self) -> Result<WalPosition, BoxError> {
        position(
            &self.leader,
            "select pg_current_wal_lsn()::text",
            self.timeout,
        )
        .await
    }

    async fn follower_position(&self, index: usize) -> Result<WalPosition, BoxError> {
        let pool = self
            .followers
            .get(index)
            .ok_or_else(|| format!("no follower {index}"))?;
        position(pool, "select pg_last_wal_replay_lsn()::text", self.timeout).await
    }
}

/// Runs `sql`, a query answering one `pg_lsn` as text, within `timeout`.
async fn position(
    pool: &bb8::Pool<Manager>,
    sql: &str,
    timeout: Duration,
) -> Result<WalPosition, BoxError> {
    let query = async {
        let conn = pool.get().await?;
        let row = conn.query_one(sql, &[]).await?;
        Ok::<_, BoxError>(row.try_get::<_, Option<String>>(0)?)
    };
    let answer = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    // pg_last_wal_replay_lsn() is NULL on a server that is not in recovery.
    let text = answer.ok_or("the server reported no WAL position (is it a follower?)")?;
    Ok(text.parse()?)
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
