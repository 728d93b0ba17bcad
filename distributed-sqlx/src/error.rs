//! The one error type of the crate.

use distributed_core::{
    ConfigError, ParseWalPositionError, READ_ONLY_SQLSTATE, Target, is_unavailable_sqlstate,
};

/// What a [`DistributedPool`](crate::DistributedPool) operation can fail with.
///
/// Causes are kept as [`source`](std::error::Error::source)s, never flattened into the message;
/// no variant carries a connection string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The statement failed: a query error, a constraint violation, a decoding error...
    /// anything that is the statement's fault rather than a server's.
    #[error("database error")]
    Database(#[source] sqlx::Error),

    /// A write was sent through a read handle and the server refused it
    /// (SQLSTATE `25006`, `read_only_sql_transaction`): every read connection is opened with
    /// `default_transaction_read_only=on`, so a write never lands unmarked, or on a follower.
    /// Send writes through [`write`](crate::DistributedPool::write),
    /// [`execute`](crate::DistributedPool::execute) or [`begin`](crate::DistributedPool::begin).
    #[error(
        "a write was sent through a read handle (SQLSTATE 25006); use write(), execute() or begin()"
    )]
    ReadOnly(#[source] sqlx::Error),

    /// The leader could not be reached: it refused or dropped the connection, or no connection
    /// to it could be had within the acquire timeout. At start-up this means the pool did not
    /// start.
    #[error("the leader is unavailable")]
    LeaderUnavailable(#[source] sqlx::Error),

    /// A read could not be served by follower `node` and no other server was left to try
    /// (rare: the others failed first).
    #[error("follower `{node}` is unavailable")]
    FollowerUnavailable {
        /// The follower's configured name.
        node: String,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },

    /// The configuration is invalid (a zero timeout, say).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),

    /// A server's connection string could not be parsed. The string itself is not shown: it may
    /// hold a password.
    #[error("invalid connection string for server `{node}`")]
    InvalidUrl {
        /// The server's configured name.
        node: String,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },

    /// The leader answered a WAL-position query with something that is not a `pg_lsn`.
    #[error("the leader answered an invalid WAL position")]
    InvalidWalPosition(#[from] ParseWalPositionError),

    /// The router was built for a different number of followers than the configuration has.
    #[error("the router knows {router} followers but the configuration has {config}")]
    RouterMismatch {
        /// Followers in the router's [`FollowerSet`](distributed_core::FollowerSet).
        router: usize,
        /// Followers in the [`Config`](distributed_core::Config).
        config: usize,
    },
}

impl From<sqlx::Error> for Error {
    /// A driver error met outside the pool (say, on a [`ReadConnection`](crate::ReadConnection)):
    /// a refused write becomes [`Error::ReadOnly`], anything else [`Error::Database`].
    fn from(error: sqlx::Error) -> Self {
        if is_read_only(&error) {
            Error::ReadOnly(error)
        } else {
            Error::Database(error)
        }
    }
}

impl Error {
    /// Classifies an error met on `target` (named `node`).
    pub(crate) fn on(target: Target, node: &str, error: sqlx::Error) -> Self {
        if !is_unavailable(&error) {
            return Error::from(error);
        }
        match target {
            Target::Leader => Error::LeaderUnavailable(error),
            Target::Follower(_) => Error::FollowerUnavailable {
                node: node.to_owned(),
                source: error,
            },
        }
    }

    /// Classifies an error met on the leader.
    pub(crate) fn on_leader(error: sqlx::Error) -> Self {
        Self::on(Target::Leader, "leader", error)
    }
}

/// Whether `error` means "that server cannot serve you now" rather than "that statement is
/// wrong": a broken or refused connection, no connection within the timeout, a server shutting
/// down or starting up.
pub(crate) fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_unavailable_sqlstate(&code)),
        _ => false,
    }
}

/// Whether `error` is a server refusing a write on a read-only connection.
pub(crate) fn is_read_only(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some(READ_ONLY_SQLSTATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_problems_are_unavailability_and_query_problems_are_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_unavailable(&sqlx::Error::Io(refused)));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }

    #[test]
    fn errors_are_classified_by_where_they_happened() {
        assert!(matches!(
            Error::on_leader(sqlx::Error::PoolTimedOut),
            Error::LeaderUnavailable(_)
        ));
        assert!(matches!(
            Error::on(Target::Follower(1), "eu", sqlx::Error::PoolTimedOut),
            Error::FollowerUnavailable { node, .. } if node == "eu"
        ));
        assert!(matches!(
            Error::on_leader(sqlx::Error::RowNotFound),
            Error::Database(_)
        ));
    }
}
