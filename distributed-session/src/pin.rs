//! Carrying the router's pin from a request's old scope key to a new session id.

use async_trait::async_trait;
use distributed_core::{CacheError, Router, Scope, ScopeKey};

/// Moves a request's read-your-writes pin to a new scope key: at login (a new session id
/// replaces the old one) and when an anonymous visitor's first request creates the session.
///
/// The engine calls it with the request's [`current_scope`](distributed_core::current_scope)
/// whenever it gives a session a new id. An `async_trait`, so the engine can hold an
/// `Arc<dyn PinCarrier>` whatever the router's type; every [`Router`] implements it.
#[async_trait]
pub trait PinCarrier: Send + Sync {
    /// Gives `scope` the key `new_key`, carrying every pin the old key (or the request so far)
    /// holds, so the next request under `new_key` reads its writes.
    ///
    /// # Errors
    /// When a pin could not be read or stored; the key is changed regardless.
    async fn carry_pins(&self, scope: &Scope, new_key: ScopeKey) -> Result<(), CacheError>;
}

/// Every [`Router`] carries pins through its [`rekey`](Router::rekey): the time-window
/// [`DistributedRouter`](distributed_core::DistributedRouter) and the causal
/// [`CausalRouter`](distributed_core::CausalRouter) alike, and `Arc`s of them.
#[async_trait]
impl<R: Router + ?Sized> PinCarrier for R {
    async fn carry_pins(&self, scope: &Scope, new_key: ScopeKey) -> Result<(), CacheError> {
        self.rekey(scope, Some(new_key)).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use distributed_core::{
        Config, DistributedRouter, MemoryCache, Reason, SessionCachedRouter, with_scope,
    };

    use super::*;

    fn router() -> DistributedRouter<SessionCachedRouter<MemoryCache>> {
        let config = Config::builder()
            .leader("l", "postgres://l/app")
            .follower("f", "postgres://f/app")
            .lag_window(Duration::from_secs(5))
            .build()
            .unwrap();
        let pins = SessionCachedRouter::new(MemoryCache::new(), config.lag_window());
        DistributedRouter::new(config, pins)
    }

    #[tokio::test]
    async fn an_old_keys_pin_from_an_earlier_request_moves_to_the_new_key() {
        let router = router();
        // An earlier request under "old" wrote.
        router
            .record_write(Some(&Scope::new("old")), None, None)
            .await
            .unwrap();
        // This request (login) reads nothing, then cycles the id.
        let login = Scope::new("old");
        router.carry_pins(&login, "new".into()).await.unwrap();
        assert_eq!(login.key(), Some("new".into()));
        let next = Scope::new("new");
        assert_eq!(
            router.route_read(Some(&next), None).await.reason,
            Reason::RecentWrite
        );
    }

    #[tokio::test]
    async fn an_anonymous_requests_own_write_moves_to_the_new_key() {
        let router = router();
        let visitor = Scope::anonymous();
        with_scope(visitor.clone(), async {
            router
                .record_write(Some(&visitor), Some("posts"), None)
                .await
                .unwrap();
        })
        .await;
        router.carry_pins(&visitor, "fresh".into()).await.unwrap();
        let next = Scope::new("fresh");
        assert_eq!(
            router.route_read(Some(&next), None).await.reason,
            Reason::RecentWrite
        );
        // Without a write, nothing is pinned.
        let idle = Scope::anonymous();
        router.carry_pins(&idle, "idle".into()).await.unwrap();
        assert_eq!(
            router
                .route_read(Some(&Scope::new("idle")), None)
                .await
                .reason,
            Reason::HealthyFollower
        );
    }
}
