//! The two queries the health and lag monitor runs.

use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{BoxError, NodeProbe, WalPosition};
use sqlx::PgPool;

/// Probes the servers through pools of their own (one connection each), so that a busy read
/// pool never makes a healthy follower look dead.
pub(crate) struct PgProbe {
    pub(crate) leader: PgPool,
    pub(crate) followers: Vec<PgPool>,
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
    pool: &PgPool,
    sql: &'static str,
    timeout: Duration,
) -> Result<WalPosition, BoxError> {
    let answer: Option<String> =
        tokio::time::timeout(timeout, sqlx::query_scalar(sql).fetch_one(pool))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
    // pg_last_wal_replay_lsn() is NULL on a server that is not in recovery.
    let text = answer.ok_or("the server reported no WAL position (is it a follower?)")?;
    Ok(text.parse()?)
}
