//! Logs never carry a session id or session contents, even when everything fails: every
//! line the store logs through saves, loads, logins, logouts, retries and a dead write, with
//! the cache down and the database down, is captured and searched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use distributed_core::SwitchableCache;
use distributed_session::{MemoryDatabase, SessionRecord, WriteBehindStore};
use distributed_testkit::LogCapture;

const SECRET: &str = "hunter2-very-secret";

#[tokio::test]
async fn no_session_id_or_content_reaches_a_log_line() {
    let (logs, _guard) = LogCapture::start();
    let cache: SwitchableCache = SwitchableCache::default();
    let db = MemoryDatabase::new();
    let store = WriteBehindStore::builder(cache.clone(), db.clone())
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .give_up_after(Duration::from_millis(200))
        .on_dead_write(|_| {})
        .build()
        .unwrap();

    let mut ids = Vec::new();
    let mut session = SessionRecord::new(Duration::from_secs(3600));
    session
        .data
        .insert("password".into(), serde_json::json!(SECRET));
    store.create(&mut session).await.unwrap();
    ids.push(session.id.to_string());

    // The cache goes down: saves write through, loads read the database.
    cache.set_down(true);
    session
        .data
        .insert("step".into(), serde_json::json!(SECRET));
    let _ = store.save(&session).await;
    let _ = store.load(&session.id).await;
    // The database goes down too: the writer retries, then gives up on a write.
    db.set_down(true);
    let _ = store.save(&session).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _ = store.load(&session.id).await;
    // Login and logout with everything down.
    if let Ok(cycled) = store.cycle_id(&session).await {
        ids.push(cycled.id.to_string());
        let _ = store.delete(&cycled.id).await;
    }
    // Everything back: the store catches up.
    cache.set_down(false);
    db.set_down(false);
    let _ = tokio::time::timeout(Duration::from_secs(5), store.flush()).await;
    let _ = store.shutdown().await;

    let text = logs.text();
    assert!(
        text.contains("WARN") || text.contains("ERROR"),
        "the failures logged nothing: the capture is not working\n{text}"
    );
    for id in &ids {
        assert!(
            !text.contains(id.as_str()),
            "a session id reached the logs:\n{text}"
        );
    }
    assert!(
        !text.contains(SECRET),
        "session contents reached the logs:\n{text}"
    );
}
