//! Carrying the router's pin from a request's old scope key to a new session id.

use std::sync::Arc;

use async_trait::async_trait;
use distributed_core::{
    CacheError, DistributedRouter, FollowerPicker, Freshness, RecentlyUpdated, Scope, ScopeKey,
    Subject, WalPosition,
};

/// Moves a request's read-your-writes pin to a new scope key: at login (a new session id
/// replaces the old one) and when an anonymous visitor's first request creates the session.
///
/// The engine calls it with the request's [`current_scope`](distributed_core::current_scope)
/// whenever it gives a session a new id. An `async_trait`, so the engine can hold an
/// `Arc<dyn PinCarrier>` whatever the router's type; [`DistributedRouter`] implements it.
#[async_trait]
pub trait PinCarrier: Send + Sync {
    /// Gives `scope` the key `new_key`, carrying every pin the old key (or the request so far)
    /// holds, so the next request under `new_key` reads its writes.
    ///
    /// # Errors
    /// When a pin could not be read or stored; the key is changed regardless.
    async fn carry_pins(&self, scope: &Scope, new_key: ScopeKey) -> Result<(), CacheError>;
}

#[async_trait]
impl<T: PinCarrier + ?Sized> PinCarrier for Arc<T> {
    async fn carry_pins(&self, scope: &Scope, new_key: ScopeKey) -> Result<(), CacheError> {
        (**self).carry_pins(scope, new_key).await
    }
}

/// Carries the whole-scope pin of the old key (kept in the pin cache by earlier requests)
/// and, through [`DistributedRouter::rekey`], everything this request learned or wrote.
///
/// In per-table mode only the whole-scope pin is read from the cache (pins of single tables
/// cannot be listed), so a per-table pin set by an earlier request carries as a whole-scope
/// pin under the new key: more reads go to the leader for the lag window, none to a stale
/// follower.
#[async_trait]
impl<R: RecentlyUpdated, P: FollowerPicker> PinCarrier for DistributedRouter<R, P> {
    async fn carry_pins(&self, scope: &Scope, new_key: ScopeKey) -> Result<(), CacheError> {
        let mut result = Ok(());
        if let Some(old_key) = scope.key().filter(|old| *old != new_key) {
            let timeout = self.config().cache_timeout();
            let old = Subject {
                scope: &old_key,
                table: None,
            };
            let known = tokio::time::timeout(timeout, self.recently().freshness(old))
                .await
                .unwrap_or(Err(CacheError::Timeout(timeout)));
            // Not knowing the old pin, pin the new key to the leader: safe for the lag window.
            let carry: Option<Option<WalPosition>> = match &known {
                Ok(Freshness::Any) => None,
                Ok(Freshness::AtLeast(position)) => Some(Some(*position)),
                Ok(Freshness::Leader) | Err(_) => Some(None),
            };
            if let Err(e) = known {
                result = Err(e);
            }
            if let Some(position) = carry {
                let new = Subject {
                    scope: &new_key,
                    table: None,
                };
                let marked =
                    tokio::time::timeout(timeout, self.recently().mark_updated_at(new, position))
                        .await
                        .unwrap_or(Err(CacheError::Timeout(timeout)));
                if let Err(e) = marked {
                    result = Err(e);
                }
            }
        }
        let rekeyed = self.rekey(scope, Some(new_key)).await;
        result.and(rekeyed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use distributed_core::{Config, MemoryCache, Reason, Router, SessionCachedRouter, with_scope};

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
