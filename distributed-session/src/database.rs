//! The database side of the engine: a small trait, and an in-memory implementation for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;

use crate::{SessionError, SessionId};

/// One row of a batched write: a session's data at `version`, or its deletion.
#[derive(Clone, Copy)]
pub struct SessionRow<'a> {
    /// The session.
    pub id: &'a SessionId,
    /// The version; the row is written only over an older one.
    pub version: u64,
    /// The data as JSON, or `None` for a tombstone (the session was deleted).
    pub data: Option<&'a [u8]>,
    /// When the row may be removed by [`SessionDatabase::delete_expired`].
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for SessionRow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRow")
            .field("version", &self.version)
            .field("tombstone", &self.data.is_none())
            .finish_non_exhaustive()
    }
}

/// A row as loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Its version.
    pub version: u64,
    /// The data as JSON, or `None` for a tombstone.
    pub data: Option<Vec<u8>>,
    /// When it expires.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("version", &self.version)
            .field("tombstone", &self.data.is_none())
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Where sessions are kept for good: one table on the leader.
///
/// An `async_trait`, so the engine can be handed an `Arc<dyn SessionDatabase>` as readily as a
/// concrete pool. Implemented (features `sqlx`, `bb8`) by [`PgSessions`](crate::PgSessions)
/// over a `sqlx::PgPool` or a `bb8` pool of `tokio-postgres` connections; [`MemoryDatabase`]
/// is the in-process one for tests.
///
/// Every implementation must keep two rules, which are what make write-behind safe:
/// - **Version guard**: a row is written only over a row with a lower version, so a write
///   that arrives late (a retried or slow batch) never overwrites a newer one.
/// - **Tombstones are final**: nothing is written over a tombstone, so once a session is
///   deleted no pending, in-flight or replayed write brings it back.
///
/// The connection must go to the **leader**: a session written a moment ago may not have
/// reached a follower, and reading it there would log its user out.
#[async_trait]
pub trait SessionDatabase: Send + Sync + 'static {
    /// Creates the table if it does not exist (idempotent, safe to run concurrently).
    async fn migrate(&self) -> Result<(), SessionError>;

    /// The row of `id`, tombstone or not, expired or not.
    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError>;

    /// Writes every row, each under the two rules above, in one statement. The ids of one
    /// call are distinct.
    ///
    /// Returns how many rows were written (the others lost to a newer version or a
    /// tombstone).
    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError>;

    /// Removes rows (sessions and tombstones) whose expiry has passed; returns how many.
    async fn delete_expired(&self) -> Result<u64, SessionError>;
}

#[async_trait]
impl<D: SessionDatabase + ?Sized> SessionDatabase for Arc<D> {
    async fn migrate(&self) -> Result<(), SessionError> {
        (**self).migrate().await
    }
    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        (**self).load(id).await
    }
    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        (**self).write(rows).await
    }
    async fn delete_expired(&self) -> Result<u64, SessionError> {
        (**self).delete_expired().await
    }
}

/// An in-process [`SessionDatabase`] with the same rules as the PostgreSQL one, for tests and
/// examples. It can be switched off to play a database that is down.
#[derive(Debug, Clone, Default)]
pub struct MemoryDatabase {
    inner: Arc<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    rows: Mutex<HashMap<SessionId, StoredSession>>,
    down: AtomicBool,
    loads: AtomicU64,
    writes: AtomicU64,
}

impl MemoryDatabase {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call fail with [`SessionError::DatabaseUnavailable`] (`true`) or work again.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// The row of `id`, read directly (no failure, no counting).
    pub fn row(&self, id: &SessionId) -> Option<StoredSession> {
        self.rows().get(id).cloned()
    }

    /// How many rows it holds, tombstones included.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    /// Whether it holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many `load` calls reached it.
    pub fn loads(&self) -> u64 {
        self.inner.loads.load(Ordering::SeqCst)
    }

    /// How many `write` calls reached it.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::SeqCst)
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, StoredSession>> {
        // Each critical section is one map operation: a poisoned map is still consistent.
        self.inner
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), SessionError> {
        if self.inner.down.load(Ordering::SeqCst) {
            return Err(SessionError::DatabaseUnavailable(
                "memory database switched off".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl SessionDatabase for MemoryDatabase {
    async fn migrate(&self) -> Result<(), SessionError> {
        self.check()
    }

    async fn load(&self, id: &SessionId) -> Result<Option<StoredSession>, SessionError> {
        self.inner.loads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        Ok(self.rows().get(id).cloned())
    }

    async fn write(&self, rows: &[SessionRow<'_>]) -> Result<u64, SessionError> {
        self.inner.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let mut map = self.rows();
        let mut written = 0;
        for row in rows {
            let wins = map
                .get(row.id)
                .is_none_or(|old| old.data.is_some() && old.version < row.version);
            if wins {
                map.insert(
                    *row.id,
                    StoredSession {
                        version: row.version,
                        data: row.data.map(<[u8]>::to_vec),
                        expires_at: row.expires_at,
                    },
                );
                written += 1;
            }
        }
        Ok(written)
    }

    async fn delete_expired(&self) -> Result<u64, SessionError> {
        self.check()?;
        let now = SystemTime::now();
        let mut map = self.rows();
        let before = map.len();
        map.retain(|_, row| row.expires_at > now);
        Ok((before - map.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn version_guard_and_final_tombstones() {
        let db = MemoryDatabase::new();
        let id = SessionId::generate();
        let later = SystemTime::now() + Duration::from_secs(60);
        let row = |version, data| SessionRow {
            id: &id,
            version,
            data,
            expires_at: later,
        };
        assert_eq!(db.write(&[row(5, Some(b"five"))]).await.unwrap(), 1);
        assert_eq!(db.write(&[row(3, Some(b"three"))]).await.unwrap(), 0);
        assert_eq!(db.row(&id).unwrap().data.as_deref(), Some(&b"five"[..]));
        assert_eq!(db.write(&[row(6, None)]).await.unwrap(), 1);
        assert_eq!(db.write(&[row(9, Some(b"nine"))]).await.unwrap(), 0);
        assert_eq!(db.row(&id).unwrap().data, None);
        db.set_down(true);
        assert!(db.load(&id).await.unwrap_err().is_transient());
    }
}
