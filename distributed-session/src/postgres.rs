//! The PostgreSQL table: its migration and statements, shared by the sqlx and bb8 drivers.

// Without a driver feature only the table name and the migration text are used.
#![cfg_attr(not(any(feature = "sqlx", feature = "bb8")), allow(dead_code))]

use std::fmt;
use std::sync::Arc;

use crate::record::to_unix_ms;
use crate::{SessionError, SessionRow};

/// The migration that creates the session table, for the default table name
/// ([`PgSessions::DEFAULT_TABLE`]). [`PgSessions::migrate`](crate::SessionDatabase::migrate)
/// runs it (with the configured name); it is here for tools that manage migrations themselves.
///
/// `data` is `bytea` holding the session's JSON rather than `jsonb`, because `jsonb` refuses
/// a `\u0000` in a string, which would make one hostile session key an undeliverable write.
/// A `NULL` `data` is a tombstone: the session was deleted, and nothing overwrites it until
/// it expires.
pub const MIGRATION: &str = include_str!("../migrations/0001_distributed_sessions.sql");

/// How many expired rows one cleanup statement removes, to keep transactions short.
pub(crate) const CLEANUP_CHUNK: u64 = 1000;

/// A session table in PostgreSQL, reached through a pool `P` of **leader** connections: a
/// `sqlx::PgPool` (feature `sqlx`) or a `bb8::Pool<bb8_postgres::PostgresConnectionManager<NoTls>>`
/// (feature `bb8`).
///
/// ```no_run
/// # #[cfg(feature = "sqlx")]
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use distributed_session::{PgSessions, SessionDatabase};
///
/// let pool = sqlx::PgPool::connect("postgres://app@leader.example/app").await?;
/// let sessions = PgSessions::new(pool);
/// sessions.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgSessions<P> {
    pub(crate) pool: P,
    pub(crate) sql: Arc<Statements>,
}

impl<P> PgSessions<P> {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "distributed_sessions";

    /// Sessions in the table [`DEFAULT_TABLE`](Self::DEFAULT_TABLE).
    pub fn new(pool: P) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(Self::DEFAULT_TABLE)),
        }
    }

    /// Sessions in the table `table`: lowercase ASCII letters, digits and `_`, starting with a
    /// letter or `_`, at most 40 characters (so that its index names fit PostgreSQL's 63).
    ///
    /// # Errors
    /// [`SessionError::Config`] for any other name.
    pub fn with_table(pool: P, table: &str) -> Result<Self, SessionError> {
        let valid = !table.is_empty()
            && table.len() <= 40
            && table
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !table.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(SessionError::Config(
                "table name must be 1-40 of [a-z0-9_], not starting with a digit",
            ));
        }
        Ok(Self {
            pool,
            sql: Arc::new(Statements::new(table)),
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The pool.
    pub fn pool(&self) -> &P {
        &self.pool
    }
}

impl<P> fmt::Debug for PgSessions<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's Debug may print its connect options; the table is all that is useful.
        f.debug_struct("PgSessions")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

/// The statements for one table name (validated by the constructor, so it can be spliced).
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) table: String,
    pub(crate) migrate: Arc<str>,
    /// `$1 text[]` ids, `$2 int8[]` versions, `$3 bytea[]` data (NULL: tombstone),
    /// `$4 int8[]` expiry in Unix milliseconds.
    pub(crate) upsert: Arc<str>,
    /// `$1 text` id -> `version int8, data bytea, expires_ms int8`.
    pub(crate) load: Arc<str>,
    /// Removes up to [`CLEANUP_CHUNK`] expired rows.
    pub(crate) cleanup: Arc<str>,
}

impl Statements {
    fn new(table: &str) -> Self {
        let t = table;
        Self {
            table: t.to_owned(),
            migrate: format!(
                "BEGIN;\n\
                 -- Serializes concurrent migrations (CREATE ... IF NOT EXISTS alone can race).\n\
                 SELECT pg_advisory_xact_lock(hashtext('distributed_session_migrate'));\n\
                 {}\n\
                 COMMIT;",
                MIGRATION.replace(PgSessions::<()>::DEFAULT_TABLE, t)
            )
            .into(),
            upsert: format!(
                "INSERT INTO {t} AS s (id, version, data, expires_at) \
                 SELECT u.id, u.version, u.data, to_timestamp(u.expires_ms::float8 / 1000) \
                 FROM UNNEST($1::text[], $2::int8[], $3::bytea[], $4::int8[]) \
                   AS u(id, version, data, expires_ms) \
                 ON CONFLICT (id) DO UPDATE \
                 SET version = EXCLUDED.version, data = EXCLUDED.data, \
                     expires_at = EXCLUDED.expires_at \
                 WHERE s.version < EXCLUDED.version AND s.data IS NOT NULL"
            )
            .into(),
            load: format!(
                "SELECT version, data, (extract(epoch FROM expires_at) * 1000)::int8 AS expires_ms \
                 FROM {t} WHERE id = $1"
            )
            .into(),
            cleanup: format!(
                "DELETE FROM {t} WHERE id IN \
                 (SELECT id FROM {t} WHERE expires_at < now() LIMIT {CLEANUP_CHUNK})"
            )
            .into(),
        }
    }
}

/// Rows turned into the four arrays the upsert unnests.
pub(crate) struct Columns<'a> {
    pub(crate) ids: Vec<String>,
    pub(crate) versions: Vec<i64>,
    pub(crate) data: Vec<Option<&'a [u8]>>,
    pub(crate) expires_ms: Vec<i64>,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(rows: &[SessionRow<'a>]) -> Result<Self, SessionError> {
        let mut columns = Self {
            ids: Vec::with_capacity(rows.len()),
            versions: Vec::with_capacity(rows.len()),
            data: Vec::with_capacity(rows.len()),
            expires_ms: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            columns.ids.push(row.id.to_string());
            columns.versions.push(
                i64::try_from(row.version)
                    .map_err(|_| SessionError::Config("version beyond int8"))?,
            );
            columns.data.push(row.data);
            columns.expires_ms.push(to_unix_ms(row.expires_at));
        }
        Ok(columns)
    }
}

/// Whether a PostgreSQL error code (SQLSTATE) means "try again later": connection
/// exceptions, resource shortages, an operator or crash shutdown, serialization failures.
pub(crate) fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("58")
        || code == "40001"
        || code == "40P01"
        || code == "25006" // read-only transaction: a failover in progress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        for good in ["sessions", "_s", "t_2024", &"a".repeat(40)] {
            assert!(PgSessions::with_table((), good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "Sessions",
            "a b",
            "a;drop table x",
            "a\"b",
            &"a".repeat(41),
        ] {
            assert!(PgSessions::with_table((), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_use_the_table_everywhere() {
        let s = PgSessions::with_table((), "custom_t").unwrap();
        assert!(!s.sql.migrate.contains(PgSessions::<()>::DEFAULT_TABLE));
        assert!(s.sql.migrate.contains("custom_t_expires_at_idx"));
        for sql in [&s.sql.upsert, &s.sql.load, &s.sql.cleanup] {
            assert!(sql.contains("custom_t"));
        }
    }

    #[test]
    fn transient_codes() {
        assert!(is_transient_sqlstate("08006"));
        assert!(is_transient_sqlstate("57P01"));
        assert!(!is_transient_sqlstate("42P01"));
        assert!(!is_transient_sqlstate("23505"));
    }
}
