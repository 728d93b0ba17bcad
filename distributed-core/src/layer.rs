//! A tower [`Layer`] that runs every request inside a [`Scope`](crate::Scope), so that the
//! router finds the request's scope with no help from application code.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Scope, ScopeKey, Scoped, with_scope};

/// Finds the scope key of a request: a session cookie, a user id header, a tenant. Closures
/// `Fn(&Request<B>) -> Option<ScopeKey>` are extractors; so is any type implementing this, for
/// a layer whose type can be named (`distributed-session`'s session cookie, say).
pub trait ExtractScope<B> {
    /// The request's scope key, or `None` for an anonymous scope.
    fn extract(&self, request: &Request<B>) -> Option<ScopeKey>;
}

impl<B, F: Fn(&Request<B>) -> Option<ScopeKey>> ExtractScope<B> for F {
    fn extract(&self, request: &Request<B>) -> Option<ScopeKey> {
        self(request)
    }
}

/// Opens a [`Scope`] for every request, keyed by what its [`ExtractScope`] finds in it (a
/// session cookie, a user id header, ...). A request where `extract` finds nothing gets an anonymous
/// scope: its writes still pin the rest of the request, and no two visitors share a pin.
///
/// The scope is also put in the request's extensions, for layers that give it a key later
/// (a session layer that creates the session, say).
///
/// ```
/// use distributed_core::{current_scope, ScopeKey, ScopeLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let layer = ScopeLayer::new(|req: &http::Request<()>| {
///     req.headers().get("x-user").and_then(|v| v.to_str().ok()).map(ScopeKey::from)
/// });
/// let app = layer.layer(service_fn(|_req: http::Request<()>| async {
///     let key = current_scope().and_then(|s| s.key());
///     Ok::<_, std::convert::Infallible>(key.map(|k| k.as_str().to_owned()))
/// }));
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let req = http::Request::builder().header("x-user", "42").body(()).unwrap();
/// assert_eq!(app.oneshot(req).await.unwrap().as_deref(), Some("42"));
/// # });
/// ```
pub struct ScopeLayer<F> {
    extract: Arc<F>,
}

impl<F> ScopeLayer<F> {
    /// A layer that keys each request's scope with `extract`.
    pub fn new(extract: F) -> Self {
        Self {
            extract: Arc::new(extract),
        }
    }
}

impl<F> Clone for ScopeLayer<F> {
    fn clone(&self) -> Self {
        Self {
            extract: self.extract.clone(),
        }
    }
}

impl<F> std::fmt::Debug for ScopeLayer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeLayer").finish_non_exhaustive()
    }
}

impl<S, F> Layer<S> for ScopeLayer<F> {
    type Service = ScopeService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        ScopeService {
            inner,
            extract: self.extract.clone(),
        }
    }
}

/// The service made by [`ScopeLayer`].
pub struct ScopeService<S, F> {
    inner: S,
    extract: Arc<F>,
}

impl<S: Clone, F> Clone for ScopeService<S, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            extract: self.extract.clone(),
        }
    }
}

impl<S: std::fmt::Debug, F> std::fmt::Debug for ScopeService<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, F, B> Service<Request<B>> for ScopeService<S, F>
where
    S: Service<Request<B>>,
    F: ExtractScope<B>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Scoped<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let scope = Scope::with_key(self.extract.extract(&req));
        req.extensions_mut().insert(scope.clone());
        with_scope(scope, self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::current_scope;

    #[tokio::test]
    async fn every_request_gets_its_own_scope() {
        let layer = ScopeLayer::new(|_: &Request<()>| None);
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            let from_ext = req.extensions().get::<Scope>().cloned();
            let current = current_scope();
            Ok::<_, Infallible>((from_ext, current))
        }));
        let (a_ext, a_cur) = svc.clone().oneshot(Request::new(())).await.unwrap();
        let (b_ext, _) = svc.oneshot(Request::new(())).await.unwrap();
        let (a_ext, a_cur, b_ext) = (a_ext.unwrap(), a_cur.unwrap(), b_ext.unwrap());
        // Anonymous, and not shared: a key set on one is not seen by the other.
        assert!(a_cur.key().is_none());
        a_ext.set_key(Some("x".into()));
        assert_eq!(a_cur.key(), Some("x".into()));
        assert!(b_ext.key().is_none());
    }
}
