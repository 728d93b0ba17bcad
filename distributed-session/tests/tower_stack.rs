//! The engine under `tower_sessions::SessionManagerLayer`, with `SessionScopeLayer` keying the
//! routing scope by the session: a visitor's first-request write, and a login, stay pinned.
#![cfg(all(feature = "tower", feature = "tower-sessions"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use distributed_core::{
    Config, DistributedRouter, MemoryCache, Router, SessionCachedRouter, current_scope,
};
use distributed_session::{MemoryDatabase, SessionId, SessionScopeLayer, WriteBehindStore};
use http::{Request, Response, header};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_sessions::{Session, SessionManagerLayer};

type TestRouter = DistributedRouter<SessionCachedRouter<MemoryCache>>;

fn router() -> Arc<TestRouter> {
    let config = Config::builder()
        .leader("leader", "postgres://leader/app")
        .follower("follower", "postgres://follower/app")
        .lag_window(Duration::from_secs(30))
        .build()
        .unwrap();
    let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
    Arc::new(DistributedRouter::new(config, pins))
}

/// The app: `/write` writes a post (recording it with the router) and puts something in the
/// session; `/login` cycles the session id; `/read` answers with where a read of posts goes.
fn app(router: Arc<TestRouter>) -> BoxCloneService<Request<String>, Response<String>, Infallible> {
    BoxCloneService::new(service_fn(move |req: Request<String>| {
        let router = router.clone();
        async move {
            let session = req.extensions().get::<Session>().cloned().unwrap();
            let scope = current_scope();
            let body = match req.uri().path() {
                "/write" => {
                    router
                        .record_write(scope.as_ref(), Some("posts"), None)
                        .await
                        .unwrap();
                    session.insert("posted", true).await.unwrap();
                    "written".to_owned()
                }
                "/login" => {
                    session.cycle_id().await.unwrap();
                    session.insert("user", 42).await.unwrap();
                    "logged in".to_owned()
                }
                _ => {
                    let decision = router.route_read(scope.as_ref(), Some("posts")).await;
                    let key = scope.and_then(|s| s.key()).map(|k| k.as_str().to_owned());
                    format!("{} {}", decision.reason.label(), key.unwrap_or_default())
                }
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    }))
}

fn request(path: &str, cookie: Option<&str>) -> Request<String> {
    let mut builder = Request::builder().uri(path);
    if let Some(id) = cookie {
        builder = builder.header(header::COOKIE, format!("id={id}"));
    }
    builder.body(String::new()).unwrap()
}

fn session_cookie(res: &Response<String>) -> Option<String> {
    res.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.strip_prefix("id="))
        .map(str::to_owned)
        .next()
}

async fn run(carry: bool) -> (String, String) {
    let router = router();
    let mut builder = WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new());
    if carry {
        builder = builder.carry_pins(router.clone());
    }
    let store = builder.build().unwrap();
    let service = ServiceBuilder::new()
        .layer(SessionScopeLayer::new())
        .layer(SessionManagerLayer::new(store.clone()).with_secure(false))
        .service(app(router));

    // An anonymous visitor's first request writes: the session is created at its end.
    let first = service
        .clone()
        .oneshot(request("/write", None))
        .await
        .unwrap();
    let id = session_cookie(&first).expect("a session cookie");
    SessionId::parse(&id).expect("one of our ids");
    let second = service
        .clone()
        .oneshot(request("/read", Some(&id)))
        .await
        .unwrap();
    let after_first_write = second.into_body();

    // Login, from a request that itself writes nothing: the pin follows the new id.
    let login = service
        .clone()
        .oneshot(request("/login", Some(&id)))
        .await
        .unwrap();
    let new_id = session_cookie(&login).expect("a new session cookie");
    assert_ne!(new_id, id);
    let third = service
        .clone()
        .oneshot(request("/read", Some(&new_id)))
        .await
        .unwrap();
    assert!(
        store.load_str(&id).await.unwrap().is_none(),
        "the old session is gone"
    );
    let user = store.load_str(&new_id).await.unwrap().unwrap().data["user"].clone();
    assert_eq!(user, 42);
    store.shutdown().await.unwrap();
    let after_login = third.into_body();
    assert!(
        after_first_write.ends_with(&id),
        "scope keyed by the cookie"
    );
    assert!(after_login.ends_with(&new_id));
    (after_first_write, after_login)
}

#[tokio::test]
async fn a_first_request_write_and_a_login_stay_pinned() {
    let (after_first_write, after_login) = run(true).await;
    assert!(
        after_first_write.starts_with("recent_write"),
        "{after_first_write}"
    );
    assert!(after_login.starts_with("recent_write"), "{after_login}");
}

#[tokio::test]
async fn without_carrying_the_pin_is_lost() {
    // The control: the same stack with no pin carrier reads a stale follower.
    let (after_first_write, after_login) = run(false).await;
    assert!(
        after_first_write.starts_with("healthy_follower"),
        "{after_first_write}"
    );
    assert!(after_login.starts_with("healthy_follower"), "{after_login}");
}

#[tokio::test]
async fn malformed_cookies_get_a_fresh_session_and_an_anonymous_scope() {
    let router = router();
    let store = WriteBehindStore::builder(MemoryCache::new(), MemoryDatabase::new())
        .carry_pins(router.clone())
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(SessionScopeLayer::new())
        .layer(SessionManagerLayer::new(store).with_secure(false))
        .service(app(router));
    let forged = SessionId::generate().to_string();
    for cookie in [
        "garbage",
        "AAAA",
        &forged[..21],
        "%1b[31mred%00",
        &"A".repeat(5000),
        &forged,
    ] {
        let read = service
            .clone()
            .oneshot(request("/read", Some(cookie)))
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        let write = service
            .clone()
            .oneshot(request("/write", Some(cookie)))
            .await
            .unwrap();
        assert_eq!(write.status(), 200);
        let fresh = session_cookie(&write).expect("a fresh session");
        assert_ne!(fresh, cookie);
    }
}
