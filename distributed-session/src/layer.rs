//! A tower layer that keys each request's routing scope by its session cookie.

use std::sync::Arc;

use distributed_core::{ExtractScope, ScopeKey, ScopeLayer, ScopeService};
use http::Request;
use http::header::COOKIE;
use tower_layer::Layer;

use crate::SessionId;

/// Runs every request inside a [`Scope`](distributed_core::Scope) keyed by its session id, read from the session
/// cookie, so the router pins reads per session with no code in the application: the
/// original package's `SessionCachedRouter` behaviour.
///
/// Put it **outside** `tower_sessions::SessionManagerLayer`, so that the session layer's save
/// at the end of the request runs inside the scope. Then, when a request creates a session
/// (a visitor's first write, or a login through `Session::cycle_id`), the store (configured
/// with [`carry_pins`](crate::WriteBehindBuilder::carry_pins)) moves the request's pin to
/// the new id, and the next request, arriving with the new cookie, reads its own writes.
///
/// A missing or malformed cookie gives an anonymous scope (its writes still pin the rest of
/// its request). The cookie is read as plain text, as `tower-sessions` writes it without its
/// `signed`/`private` features. The scope is also put in the request's extensions.
///
/// ```
/// use distributed_session::SessionScopeLayer;
/// use tower::ServiceBuilder;
/// # use tower::service_fn;
/// # let app = service_fn(|_req: http::Request<()>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// # let session_layer = tower::layer::util::Identity::new();
///
/// // `session_layer` is a `tower_sessions::SessionManagerLayer` over a `WriteBehindStore`.
/// let service = ServiceBuilder::new()
///     .layer(SessionScopeLayer::new()) // outer: the scope spans the session's save
///     .layer(session_layer)
///     .service(app);
/// # let _ = service;
/// ```
#[derive(Debug, Clone)]
pub struct SessionScopeLayer {
    inner: ScopeLayer<SessionCookie>,
}

impl SessionScopeLayer {
    /// The cookie name `tower-sessions` uses by default.
    pub const DEFAULT_COOKIE: &'static str = "id";

    /// Reads the cookie [`DEFAULT_COOKIE`](Self::DEFAULT_COOKIE).
    pub fn new() -> Self {
        Self::with_cookie(Self::DEFAULT_COOKIE)
    }

    /// Reads the cookie `name` (as given to `SessionManagerLayer::with_name`).
    pub fn with_cookie(name: &str) -> Self {
        Self {
            inner: ScopeLayer::new(SessionCookie { name: name.into() }),
        }
    }
}

impl Default for SessionScopeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for SessionScopeLayer {
    type Service = SessionScopeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.inner.layer(inner)
    }
}

/// The service made by [`SessionScopeLayer`]: core's scope service, keyed by the cookie.
pub type SessionScopeService<S> = ScopeService<S, SessionCookie>;

/// The [`ExtractScope`] of [`SessionScopeLayer`]: the session id in a named cookie.
#[derive(Debug, Clone)]
pub struct SessionCookie {
    name: Arc<str>,
}

impl<B> ExtractScope<B> for SessionCookie {
    fn extract(&self, request: &Request<B>) -> Option<ScopeKey> {
        session_cookie(request, &self.name).map(|id| ScopeKey::from(id.to_string()))
    }
}

/// The session id in the request's cookie `name`, if there is a well-formed one.
pub fn session_cookie<B>(req: &Request<B>, name: &str) -> Option<SessionId> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|header| header.to_str().ok())
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(key, _)| *key == name)
        .find_map(|(_, value)| SessionId::parse(value.trim_matches('"')).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cookies: &[&str]) -> Request<()> {
        let mut b = Request::builder();
        for c in cookies {
            b = b.header(COOKIE, *c);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        let id = SessionId::generate();
        let found = |cookies: &[&str]| session_cookie(&req(cookies), "id");
        assert_eq!(found(&[&format!("a=1; id={id}; b=2")]), Some(id));
        assert_eq!(found(&["a=1", &format!("id={id}")]), Some(id));
        assert_eq!(found(&[&format!("xid={id}")]), None);
        assert_eq!(found(&["id=garbage", &format!("id={id}")]), Some(id));
        assert_eq!(found(&["id=../../etc/passwd"]), None);
        assert_eq!(found(&[]), None);
    }
}
