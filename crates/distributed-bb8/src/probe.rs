//! The two queries the health and lag monitor runs.

use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{BoxError, NodeProbe, WalPosition};

use crate::Manager;

/// Probes the servers through pools of their own (one connection each), so that a busy read
/// pool never makes a healthy follower look dead.
pub(crate) struct PgProbe {
    pub(crate) leader: bb8::Pool<Manager>,
    pub(crate) followers: Vec<bb8::Pool<Manager>>,
    pub(crate) timeout: Duration,
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
pub(crate) async fn position(
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
