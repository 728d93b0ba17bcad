//! Transactions: always on the leader, marking the scope when they commit.

use std::fmt;
use std::ops::{Deref, DerefMut};

use distributed_core::Scope;
use sqlx::PgConnection;
use sqlx::postgres::Postgres;
use tracing::Instrument;

use crate::Error;
use crate::pool::Marker;

/// A transaction on the leader, from [`DistributedPool::begin`](crate::DistributedPool::begin).
///
/// Run statements on it like on sqlx's own transaction (`query.execute(&mut *tx)`).
/// [`commit`](Self::commit) marks the scope that began it, so that scope's next reads see the
/// write; dropping it without committing rolls back and marks nothing.
pub struct Transaction {
    tx: sqlx::Transaction<'static, Postgres>,
    marker: Marker,
    scope: Option<Scope>,
    table: Option<String>,
}

impl Transaction {
    pub(crate) fn new(
        tx: sqlx::Transaction<'static, Postgres>,
        marker: Marker,
        scope: Option<Scope>,
        table: Option<String>,
    ) -> Self {
        Self {
            tx,
            marker,
            scope,
            table,
        }
    }

    /// Commits, then marks the scope that began the transaction.
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the connection broke while committing (the scope is
    /// marked anyway: the commit may have happened); [`Error::Database`] when the server
    /// refused to commit.
    pub async fn commit(self) -> Result<(), Error> {
        let Self {
            tx,
            marker,
            scope,
            table,
        } = self;
        let span = tracing::debug_span!(
            "distributed_sqlx",
            target_kind = "leader",
            reason = "write",
            statement = "commit"
        );
        async {
            let outcome = tx.commit().await;
            marker
                .settle(scope.as_ref(), table.as_deref(), outcome)
                .await
                .map_err(Error::on_leader)
        }
        .instrument(span)
        .await
    }

    /// Rolls back; nothing is marked.
    ///
    /// # Errors
    /// When the server could not be told; it rolls back on its own when the connection closes.
    pub async fn rollback(self) -> Result<(), Error> {
        self.tx.rollback().await.map_err(Error::on_leader)
    }
}

impl Deref for Transaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for Transaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}
