//! [`SessionDatabase`] for a `bb8` pool of `tokio-postgres` connections.

use async_trait::async_trait;
use bb8::{Pool, RunError};
use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;
use tokio_postgres::types::{ToSql, Type};

use crate::postgres::{CLEANUP_CHUNK, Columns, is_transient_sqlstate};
use crate::record::from_unix_ms;
use crate::{PgSessions, SessionDatabase, SessionError, SessionId, SessionRow, StoredSession};

type Bb8Pool = Pool<PostgresConnectionManager<NoTls>>;

#[async_trait]
impl SessionDatabase for PgSessions<Bb8Pool> {
    async fn migrate(&self) -> Result<(), SessionError> {
        let conn = self.pool.get().await.map_err(classify_run)?;
        conn.batch_execute(&self.sql.migrate)
            .await
            .map_err(classify)
    }

    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        let conn = self.pool.get().await.map_err(classify_run)?;
        let id = id.to_string();
        // Typed queries need no separate prepare round trip.
        let row = conn
            .query_typed_opt(&self.sql.load, &[(&id, Type::TEXT)])
            .await
            .map_err(classify)?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get(0).map_err(rejected)?;
        let data: Option<Vec<u8>> = row.try_get(1).map_err(rejected)?;
        let expires_ms: i64 = row.try_get(2).map_err(rejected)?;
        Ok(Some(StoredSession {
            version: u64::try_from(version)
                .map_err(|_| SessionError::DatabaseRejected("negative version".into()))?,
            data,
            expires_at: from_unix_ms(expires_ms),
        }))
    }

    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        let columns = Columns::new(rows)?;
        let conn = self.pool.get().await.map_err(classify_run)?;
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&columns.ids, Type::TEXT_ARRAY),
            (&columns.versions, Type::INT8_ARRAY),
            (&columns.data, Type::BYTEA_ARRAY),
            (&columns.expires_ms, Type::INT8_ARRAY),
        ];
        conn.execute_typed(&self.sql.upsert, &params)
            .await
            .map_err(classify)
    }

    async fn delete_expired(&self) -> Result<u64, SessionError> {
        let conn = self.pool.get().await.map_err(classify_run)?;
        let mut total = 0;
        loop {
            let removed = conn
                .execute_typed(&self.sql.cleanup, &[])
                .await
                .map_err(classify)?;
            total += removed;
            if removed < CLEANUP_CHUNK {
                return Ok(total);
            }
        }
    }
}

fn classify(e: tokio_postgres::Error) -> SessionError {
    // No SQLSTATE means the client side failed: a closed or broken connection.
    let transient = e
        .code()
        .is_none_or(|code| is_transient_sqlstate(code.code()));
    if transient {
        SessionError::DatabaseUnavailable(Box::new(e))
    } else {
        SessionError::DatabaseRejected(Box::new(e))
    }
}

/// A row that does not decode: retrying will not help.
fn rejected(e: tokio_postgres::Error) -> SessionError {
    SessionError::DatabaseRejected(Box::new(e))
}

fn classify_run(e: RunError<tokio_postgres::Error>) -> SessionError {
    match e {
        RunError::User(e) => classify(e),
        RunError::TimedOut => {
            SessionError::DatabaseUnavailable(Box::new(RunError::<tokio_postgres::Error>::TimedOut))
        }
    }
}
