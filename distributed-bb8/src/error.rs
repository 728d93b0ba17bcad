//! The one error type of the crate.

use bb8::RunError;
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
    /// The statement failed: a query error, a constraint violation, a conversion error...
    /// anything that is the statement's fault rather than a server's.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),

    /// A write was sent through a read handle and the server refused it
    /// (SQLSTATE `25006`, `read_only_sql_transaction`): every read connection is opened with
    /// `default_transaction_read_only=on`, so a write never lands unmarked, or on a follower.
    /// Send writes through [`execute`](crate::DistributedPool::execute),
    /// [`write`](crate::DistributedPool::write) or
    /// [`transaction`](crate::DistributedPool::transaction).
    #[error(
        "a write was sent through a read handle (SQLSTATE 25006); use execute(), write() or transaction()"
    )]
    ReadOnly(#[source] tokio_postgres::Error),

    /// The leader could not be reached: it refused or dropped the connection, or no connection
    /// to it could be had within the acquire timeout. At start-up this means the pool did not
    /// start.
    #[error("the leader is unavailable")]
    LeaderUnavailable(#[source] RunError<tokio_postgres::Error>),

    /// A read could not be served by follower `node` and no other server was left to try
    /// (rare: the others failed first).
    #[error("follower `{node}` is unavailable")]
    FollowerUnavailable {
        /// The follower's configured name.
        node: String,
        /// What the pool or the driver reported.
        #[source]
        source: RunError<tokio_postgres::Error>,
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
        source: tokio_postgres::Error,
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

impl From<tokio_postgres::Error> for Error {
    /// A driver error met outside the pool (say, on a [`ReadConnection`](crate::ReadConnection)):
    /// a refused write becomes [`Error::ReadOnly`], anything else [`Error::Database`].
    fn from(error: tokio_postgres::Error) -> Self {
        if error.code().map(|code| code.code()) == Some(READ_ONLY_SQLSTATE) {
            Error::ReadOnly(error)
        } else {
            Error::Database(error)
        }
    }
}

impl Error {
    /// Classifies an error met on `target` (named `node`).
    pub(crate) fn on(target: Target, node: &str, error: RunError<tokio_postgres::Error>) -> Self {
        match error {
            RunError::User(error) if !is_server_gone(&error) => Error::from(error),
            error => match target {
                Target::Leader => Error::LeaderUnavailable(error),
                Target::Follower(_) => Error::FollowerUnavailable {
                    node: node.to_owned(),
                    source: error,
                },
            },
        }
    }

    /// Classifies an error met on the leader.
    pub(crate) fn on_leader(error: RunError<tokio_postgres::Error>) -> Self {
        Self::on(Target::Leader, "leader", error)
    }
}

/// Whether `error` means "that server cannot serve you now" rather than "that statement is
/// wrong": no connection within the timeout, a broken or refused connection, a server shutting
/// down or starting up.
pub(crate) fn is_unavailable(error: &RunError<tokio_postgres::Error>) -> bool {
    match error {
        RunError::TimedOut => true,
        RunError::User(error) => is_server_gone(error),
    }
}

fn is_server_gone(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        return is_unavailable_sqlstate(code.code());
    }
    // Socket errors (refused, reset, unexpected end of stream) carry the io::Error as cause.
    std::error::Error::source(error).is_some_and(|cause| cause.is::<std::io::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_unavailability_and_land_on_the_server_that_timed_out() {
        assert!(is_unavailable(&RunError::TimedOut));
        assert!(matches!(
            Error::on_leader(RunError::TimedOut),
            Error::LeaderUnavailable(RunError::TimedOut)
        ));
        assert!(matches!(
            Error::on(Target::Follower(0), "eu", RunError::TimedOut),
            Error::FollowerUnavailable { node, .. } if node == "eu"
        ));
    }

    #[test]
    fn a_bad_connection_string_is_not_unavailability() {
        let Err(error) = "host=h port=notaport".parse::<tokio_postgres::Config>() else {
            panic!("parsed a bad port");
        };
        assert!(!is_server_gone(&error));
        assert!(matches!(Error::from(error), Error::Database(_)));
    }
}
