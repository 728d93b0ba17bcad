//! The router the tests use: the core router of the mode under test, recording the commit
//! positions adapters report.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distributed_core::{
    CacheError, CausalRouter, CausalTracker, Config, ConsistencyToken, Decision, DistributedRouter,
    FollowerSet, NodeProbe, Router, Scope, ScopeKey, SessionCachedRouter, WalPosition,
};

use crate::SwitchableCache;

/// How the router under test keeps a scope's reads fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// [`DistributedRouter`] over [`SessionCachedRouter`]: a write pins the scope to the leader
    /// for the lag window.
    Time,
    /// [`CausalRouter`]: the pool reports each write's WAL position
    /// ([`Settings::track_commit_position`](crate::Settings)); the scope's reads go to any
    /// follower that has replayed it. Monotonic reads off, as by default.
    Causal,
}

impl Mode {
    /// Whether pools must report commit positions for the mode to work.
    pub fn tracks_positions(self) -> bool {
        self == Mode::Causal
    }
}

type Cache = Arc<SwitchableCache>;

#[derive(Debug)]
enum Inner {
    Time(DistributedRouter<SessionCachedRouter<Cache>>),
    Causal(CausalRouter<Cache>),
}

/// The router of a [`Mode`], its pins or positions in a [`SwitchableCache`], remembering the
/// position handed to every [`record_write`](Router::record_write).
#[derive(Debug)]
pub struct TestRouter {
    inner: Inner,
    positions: Mutex<Vec<Option<WalPosition>>>,
}

impl TestRouter {
    /// A time-mode router over `config`, its pins in `cache` for the configured lag window.
    pub fn new(config: Config, cache: Cache) -> Self {
        Self::for_mode(config, cache, Mode::Time)
    }

    /// A router of `mode` over `config`, keeping what it learns in `cache`.
    pub fn for_mode(config: Config, cache: Cache, mode: Mode) -> Self {
        match mode {
            Mode::Time => {
                let pins = SessionCachedRouter::new(cache, config.lag_window());
                Self::with(Inner::Time(DistributedRouter::new(config, pins)))
            }
            Mode::Causal => Self::causal(config, cache, false),
        }
    }

    /// A causal router, with monotonic reads on or off.
    pub fn causal(config: Config, cache: Cache, monotonic_reads: bool) -> Self {
        let tracker =
            CausalTracker::new(cache, config.lag_window()).monotonic_reads(monotonic_reads);
        // An on-demand check, once attached, may wait for a connection on a loaded test
        // machine: a slow check would send the read to the leader and fail a test for nothing.
        let router = CausalRouter::new(config, tracker).probe_timeout(Duration::from_secs(2));
        Self::with(Inner::Causal(router))
    }

    fn with(inner: Inner) -> Self {
        Self {
            inner,
            positions: Mutex::new(Vec::new()),
        }
    }

    /// The router's mode.
    pub fn mode(&self) -> Mode {
        match self.inner {
            Inner::Time(_) => Mode::Time,
            Inner::Causal(_) => Mode::Causal,
        }
    }

    /// The positions adapters reported with each write of a scope, in order.
    pub fn recorded_positions(&self) -> Vec<Option<WalPosition>> {
        self.positions.lock().expect("positions").clone()
    }

    /// The newest position reported with a write, if any.
    pub fn newest_position(&self) -> Option<WalPosition> {
        self.recorded_positions().into_iter().flatten().max()
    }

    /// The consistency token of `scope` (its writes and, in causal mode, what it read).
    ///
    /// # Errors
    /// When the cache could not answer.
    pub async fn token(&self, scope: &Scope) -> Result<ConsistencyToken, CacheError> {
        match &self.inner {
            Inner::Time(r) => r.token(scope).await,
            Inner::Causal(r) => r.token(scope).await,
        }
    }

    /// Turns on causal mode's on-demand check through `probe`; `false` in time mode, or when a
    /// probe is already attached.
    pub fn attach_probe(&self, probe: Arc<dyn NodeProbe>) -> bool {
        match &self.inner {
            Inner::Time(_) => false,
            Inner::Causal(r) => r.attach_probe(probe),
        }
    }

    fn router(&self) -> &dyn Router {
        match &self.inner {
            Inner::Time(r) => r,
            Inner::Causal(r) => r,
        }
    }
}

#[async_trait]
impl Router for TestRouter {
    async fn route_read(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        self.router().route_read(scope, table).await
    }

    fn route_write(&self, scope: Option<&Scope>, table: Option<&str>) -> Decision {
        self.router().route_write(scope, table)
    }

    async fn record_write(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        position: Option<WalPosition>,
    ) -> Result<(), CacheError> {
        self.positions.lock().expect("positions").push(position);
        self.router().record_write(scope, table, position).await
    }

    fn followers(&self) -> &FollowerSet {
        self.router().followers()
    }

    fn tracks_reads(&self) -> bool {
        self.router().tracks_reads()
    }

    async fn record_read(
        &self,
        scope: &Scope,
        table: Option<&str>,
        decision: Decision,
        seen: Option<WalPosition>,
    ) {
        self.router()
            .record_read(scope, table, decision, seen)
            .await;
    }

    async fn end_request(&self, scope: &Scope) {
        self.router().end_request(scope).await;
    }

    async fn rekey(&self, scope: &Scope, key: Option<ScopeKey>) -> Result<(), CacheError> {
        self.router().rekey(scope, key).await
    }
}
