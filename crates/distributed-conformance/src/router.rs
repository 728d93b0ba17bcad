//! The router the tests use: the core router, recording the commit positions adapters report.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use distributed_core::{
    CacheError, Config, Decision, DistributedRouter, FollowerSet, Router, Scope,
    SessionCachedRouter, WalPosition,
};

use crate::SwitchableCache;

/// [`DistributedRouter`] pinning per scope in a [`SwitchableCache`], remembering the position
/// handed to every [`record_write`](Router::record_write).
#[derive(Debug)]
pub struct TestRouter {
    inner: DistributedRouter<SessionCachedRouter<Arc<SwitchableCache>>>,
    positions: Mutex<Vec<Option<WalPosition>>>,
}

impl TestRouter {
    /// A router over `config`, its pins in `cache` for the configured lag window.
    pub fn new(config: Config, cache: Arc<SwitchableCache>) -> Self {
        let pins = SessionCachedRouter::new(cache, config.lag_window());
        Self {
            inner: DistributedRouter::new(config, pins),
            positions: Mutex::new(Vec::new()),
        }
    }

    /// The positions adapters reported with each write of a scope, in order.
    pub fn recorded_positions(&self) -> Vec<Option<WalPosition>> {
        self.positions.lock().expect("positions").clone()
    }
}

#[async_trait]
impl Router for TestRouter {
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        self.inner.route_read(scope, table).await
    }

    fn route_write(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        self.inner.route_write(scope, table)
    }

    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError> {
        self.positions.lock().expect("positions").push(position);
        self.inner.record_write(scope, table, position).await
    }

    fn followers(&self) -> &FollowerSet {
        self.inner.followers()
    }
}
