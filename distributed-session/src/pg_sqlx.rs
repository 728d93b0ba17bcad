//! [`SessionDatabase`] for a `sqlx::PgPool`.

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, PgPool};

use crate::postgres::{CLEANUP_CHUNK, Columns, is_transient_sqlstate};
use crate::record::from_unix_ms;
use crate::{PgSessions, SessionDatabase, SessionError, SessionId, SessionRow, StoredSession};

#[async_trait]
impl SessionDatabase for PgSessions<PgPool> {
    async fn migrate(&self) -> Result<(), SessionError> {
        sqlx::raw_sql(AssertSqlSafe(self.sql.migrate.clone()))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        let row: Option<(i64, Option<Vec<u8>>, i64)> =
            sqlx::query_as(AssertSqlSafe(self.sql.load.clone()))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        row.map(|(version, data, expires_ms)| {
            Ok(StoredSession {
                version: u64::try_from(version)
                    .map_err(|_| SessionError::DatabaseRejected("negative version".into()))?,
                data,
                expires_at: from_unix_ms(expires_ms),
            })
        })
        .transpose()
    }

    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        let columns = Columns::new(rows)?;
        let done = sqlx::query(AssertSqlSafe(self.sql.upsert.clone()))
            .bind(columns.ids)
            .bind(columns.versions)
            .bind(columns.data)
            .bind(columns.expires_ms)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn delete_expired(&self) -> Result<u64, SessionError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(AssertSqlSafe(self.sql.cleanup.clone()))
                .execute(&self.pool)
                .await
                .map_err(classify)?;
            total += done.rows_affected();
            if done.rows_affected() < CLEANUP_CHUNK {
                return Ok(total);
            }
        }
    }
}

fn classify(e: sqlx::Error) -> SessionError {
    let transient = match &e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    if transient {
        SessionError::DatabaseUnavailable(Box::new(e))
    } else {
        SessionError::DatabaseRejected(Box::new(e))
    }
}
