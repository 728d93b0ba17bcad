//! `tower-sessions` 0.15: the engine as a `SessionStore`.

use std::collections::HashMap;
use std::time::SystemTime;

use async_trait::async_trait;
use distributed_core::Cache;
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

use crate::{SessionDatabase, SessionError, SessionId, SessionRecord, WriteBehindStore};

/// The engine behind `tower_sessions::SessionManagerLayer`.
///
/// `create` draws a fresh 128-bit id from the engine's generator (ignoring the one
/// tower-sessions proposes) and carries the request's pin to it, so a visitor's first request
/// and a login (`Session::cycle_id`) keep reading their own writes. A save of a session that
/// this engine has just deleted (a request racing its own logout) is not written: the
/// logout stands.
#[async_trait]
impl<C: Cache + 'static, D: SessionDatabase> SessionStore for WriteBehindStore<C, D> {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let mut ours = from_tower(record);
        WriteBehindStore::create(self, &mut ours)
            .await
            .map_err(to_tower)?;
        record.id = Id(ours.id.to_i128());
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        match WriteBehindStore::save(self, &from_tower(record)).await {
            Ok(_) => Ok(()),
            Err(SessionError::Deleted) => {
                metrics::counter!("distributed_session_saves_after_delete_total").increment(1);
                tracing::debug!("save of a session deleted by this engine ignored");
                Ok(())
            }
            Err(e) => Err(to_tower(e)),
        }
    }

    async fn load(&self, session_id: &Id) -> session_store::Result<Option<Record>> {
        let id = SessionId::from_i128(session_id.0);
        let loaded = WriteBehindStore::load(self, &id).await.map_err(to_tower)?;
        Ok(loaded.map(|record| to_tower_record(&record)))
    }

    async fn delete(&self, session_id: &Id) -> session_store::Result<()> {
        WriteBehindStore::delete(self, &SessionId::from_i128(session_id.0))
            .await
            .map_err(to_tower)
    }
}

#[async_trait]
impl<C: Cache + 'static, D: SessionDatabase> ExpiredDeletion for WriteBehindStore<C, D> {
    async fn delete_expired(&self) -> session_store::Result<()> {
        WriteBehindStore::delete_expired(self)
            .await
            .map(|_| ())
            .map_err(to_tower)
    }
}

fn from_tower(record: &Record) -> SessionRecord {
    SessionRecord {
        id: SessionId::from_i128(record.id.0),
        data: record
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        expires_at: SystemTime::from(record.expiry_date),
    }
}

fn to_tower_record(record: &SessionRecord) -> Record {
    Record {
        id: Id(record.id.to_i128()),
        data: record
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        expiry_date: OffsetDateTime::from(record.expires_at),
    }
}

/// tower-sessions errors are strings; ours never contain an id or data.
fn to_tower(e: SessionError) -> session_store::Error {
    let message = error_chain(&e);
    match e {
        SessionError::TooLarge { .. } | SessionError::Codec(_) => {
            session_store::Error::Encode(message)
        }
        _ => session_store::Error::Backend(message),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use distributed_core::MemoryCache;

    use super::*;
    use crate::MemoryDatabase;

    fn record() -> Record {
        let mut data = HashMap::new();
        data.insert("user".to_owned(), serde_json::json!(7));
        Record {
            id: Id(0),
            data,
            expiry_date: OffsetDateTime::now_utc() + time::Duration::minutes(30),
        }
    }

    #[tokio::test]
    async fn create_save_load_delete_through_the_trait() {
        let store = WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new())
            .build()
            .unwrap();
        let tower: Arc<dyn SessionStore> = Arc::new(store.clone());
        let mut r = record();
        tower.create(&mut r).await.unwrap();
        assert_ne!(r.id, Id(0), "a fresh id replaces the proposed one");
        let loaded = tower.load(&r.id).await.unwrap().unwrap();
        assert_eq!(loaded.data, r.data);
        assert_eq!(
            loaded.expiry_date.unix_timestamp(),
            r.expiry_date.unix_timestamp()
        );
        // The same text in the cookie and in the engine.
        assert_eq!(r.id.to_string(), SessionId::from_i128(r.id.0).to_string());
        tower.delete(&r.id).await.unwrap();
        assert!(tower.load(&r.id).await.unwrap().is_none());
        // A racing save after the logout does not resurrect it, and is no error.
        tower.save(&r).await.unwrap();
        store.flush().await.unwrap();
        assert!(tower.load(&r.id).await.unwrap().is_none());
        assert!(
            store
                .database()
                .row(&SessionId::from_i128(r.id.0))
                .unwrap()
                .data
                .is_none()
        );
    }

    #[tokio::test]
    async fn errors_map_without_ids_or_data() {
        let store = WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new())
            .max_session_bytes(10)
            .build()
            .unwrap();
        let mut r = record();
        r.data.insert("secret".into(), "hunter2-hunter2".into());
        let e = SessionStore::create(&store, &mut r).await.unwrap_err();
        assert!(matches!(e, session_store::Error::Encode(_)));
        assert!(!e.to_string().contains("hunter2"));
        let _ = Duration::ZERO;
    }
}
