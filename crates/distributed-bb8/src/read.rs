//! The connection a read runs on.

use std::fmt;
use std::ops::{Deref, DerefMut};

use distributed_core::{Decision, Target};
use tokio_postgres::Client;

use crate::Connection;

/// A read-only connection to the server the router chose, with the decision that chose it.
///
/// Use it as a [`tokio_postgres::Client`] (`conn.query_opt(..)`). It is opened with
/// `default_transaction_read_only=on`, so a write sent through it fails with
/// [`Error::ReadOnly`](crate::Error::ReadOnly) (once converted with `?` or `Error::from`)
/// instead of landing unmarked. Dropping it returns it to its pool.
pub struct ReadConnection {
    conn: Connection,
    decision: Decision,
}

impl ReadConnection {
    pub(crate) fn new(conn: Connection, decision: Decision) -> Self {
        Self { conn, decision }
    }

    /// Where this read went and why.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// Where this read went.
    pub fn target(&self) -> Target {
        self.decision.target
    }
}

impl Deref for ReadConnection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.conn
    }
}

impl DerefMut for ReadConnection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.conn
    }
}

impl fmt::Debug for ReadConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadConnection")
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}
