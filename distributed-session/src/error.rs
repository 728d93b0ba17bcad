//! The crate's one error type.

use distributed_core::{BoxError, CacheError};

/// What the session engine and its databases can fail with.
///
/// No variant carries a session id or session data, so an error can be logged as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The text is not a session id this crate issues (length, alphabet or padding bits).
    /// Rejected before any cache or database call.
    #[error("malformed session id")]
    InvalidId,
    /// The encoded session is larger than the configured limit; nothing was written.
    #[error("session of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The session data could not be encoded or decoded as JSON.
    #[error("session data is not valid JSON")]
    Codec(#[source] serde_json::Error),
    /// The session was deleted (logged out) by this engine; a save cannot bring it back.
    #[error("the session was deleted")]
    Deleted,
    /// The database could not be reached, or the connection failed mid-call; retrying may
    /// succeed.
    #[error("session database unavailable")]
    DatabaseUnavailable(#[source] BoxError),
    /// The database answered with an error that retrying the same call will not fix.
    #[error("session database rejected the call")]
    DatabaseRejected(#[source] BoxError),
    /// The outbox was full for longer than the back-pressure timeout and writing through to
    /// the database failed: the save was not accepted (and the caller is told so).
    #[error("session outbox full and the database write failed")]
    Overloaded(#[source] Box<SessionError>),
    /// Writes accepted before a [`flush`](crate::WriteBehindStore::flush) or
    /// [`shutdown`](crate::WriteBehindStore::shutdown) were given up on after the retry bound;
    /// each was reported to the dead-write hook.
    #[error("{count} session writes were given up after the retry bound")]
    DeadWrites {
        /// How many.
        count: u64,
    },
    /// The store is shutting down and accepts no more writes.
    #[error("the session store is shut down")]
    ShutDown,
    /// A configuration value is out of range.
    #[error("invalid session store configuration: {0}")]
    Config(&'static str),
    /// The cache failed where the engine could not work around it.
    #[error("session cache error")]
    Cache(#[from] CacheError),
}

impl SessionError {
    /// Whether retrying the same call later may succeed (the database was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            SessionError::DatabaseUnavailable(_) => true,
            SessionError::Overloaded(inner) => inner.is_transient(),
            SessionError::Cache(e) => e.is_unavailable(),
            _ => false,
        }
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SessionError::InvalidId => "invalid_id",
            SessionError::TooLarge { .. } => "too_large",
            SessionError::Codec(_) => "codec",
            SessionError::Deleted => "deleted",
            SessionError::DatabaseUnavailable(_) => "database_unavailable",
            SessionError::DatabaseRejected(_) => "database_rejected",
            SessionError::Overloaded(_) => "overloaded",
            SessionError::DeadWrites { .. } => "dead_writes",
            SessionError::ShutDown => "shut_down",
            SessionError::Config(_) => "config",
            SessionError::Cache(_) => "cache",
        }
    }
}
