//! The connection a read runs on.

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;

/// A read-only connection to the server the router chose, with the decision that chose it
/// ([`decision`](distributed_core::Routed::decision), [`target`](distributed_core::Routed::target)).
///
/// Use it like sqlx's own pool connection: `query.fetch_one(&mut *conn)`. It is opened with
/// `default_transaction_read_only=on`, so a write sent through it fails with
/// [`Error::ReadOnly`](crate::Error::ReadOnly) (once converted with `?` or `Error::from`)
/// instead of landing unmarked. Dropping it returns it to its pool.
pub type ReadConnection = distributed_core::Routed<PoolConnection<Postgres>>;
