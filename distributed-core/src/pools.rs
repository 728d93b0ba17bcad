//! The routing plumbing every database adapter shares: a leader pool, a read-only pool for reads
//! routed to the leader, one pool per follower, the router deciding between them, the monitor,
//! and the marking of scopes after writes. An adapter implements [`Backend`] for its driver and
//! keeps only what is driver-specific: building a pool, its connection types, its errors.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use crate::{
    BoxError, Config, ConfigError, Decision, MonitorHandle, NodeProbe, ParseWalPositionError,
    Router, Scope, Target, WalPosition, current_scope, read_with_failover, spawn_monitor,
};

/// A database driver's connection pool, as the routing needs it.
///
/// A `Backend` value holds the servers' connection options, already parsed (so building a pool
/// cannot fail); the rest are associated functions on the pool it built. Dispatch is static
/// (native `async fn` in traits, returning `Send` futures): an adapter knows its backend at
/// compile time, and no `Box` is paid per statement. The probe built over it ([`ServerProbe`])
/// is what goes behind `dyn` ([`NodeProbe`] uses `async-trait`).
///
/// ```
/// use std::time::Duration;
///
/// use distributed_core::{Backend, Target};
///
/// /// A "driver" whose servers always answer.
/// struct Always;
///
/// impl Backend for Always {
///     type Pool = &'static str;
///     type Conn = &'static str;
///     type Error = std::io::Error;
///
///     fn pool(&self, target: Target, _read_only: bool, _timeout: Duration, _size: u32) -> Self::Pool {
///         if target == Target::Leader { "leader" } else { "follower" }
///     }
///     async fn acquire(pool: &Self::Pool) -> Result<Self::Conn, Self::Error> {
///         Ok(*pool)
///     }
///     async fn query_lsn(_pool: &Self::Pool, _sql: &'static str) -> Result<Option<String>, Self::Error> {
///         Ok(Some("0/16B3748".to_owned()))
///     }
///     async fn conn_lsn(_conn: &mut Self::Conn, _sql: &'static str) -> Result<Option<String>, Self::Error> {
///         Ok(Some("0/16B3748".to_owned()))
///     }
///     fn is_unavailable(error: &Self::Error) -> bool {
///         error.kind() == std::io::ErrorKind::ConnectionRefused
///     }
///     fn span(node: &str, decision: distributed_core::Decision) -> tracing::Span {
///         tracing::debug_span!("always", node, target_kind = decision.target.kind())
///     }
/// }
/// ```
pub trait Backend: Send + Sync + 'static {
    /// The driver's pool of connections to one server.
    type Pool: Send + Sync + 'static;
    /// A connection taken from a pool; returned to it when dropped.
    type Conn: Send + 'static;
    /// What the driver fails with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A pool of at most `size` connections to `target`, connecting lazily, waiting at most
    /// `timeout` for a connection; with every session read-only
    /// (`default_transaction_read_only=on`) when `read_only`.
    fn pool(&self, target: Target, read_only: bool, timeout: Duration, size: u32) -> Self::Pool;

    /// A connection from `pool`.
    fn acquire(pool: &Self::Pool) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// Runs `sql`, a query answering one `pg_lsn` as text (or `NULL`), on a connection of `pool`.
    fn query_lsn(
        pool: &Self::Pool,
        sql: &'static str,
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send;

    /// Runs `sql`, a query answering one `pg_lsn` as text (or `NULL`), on `conn` itself: after
    /// whatever ran on it before, so the answer bounds what those statements saw.
    fn conn_lsn(
        conn: &mut Self::Conn,
        sql: &'static str,
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send;

    /// Whether `error` means "that server cannot serve you now" (refused, broken, timed out,
    /// shutting down) rather than "that statement is wrong".
    fn is_unavailable(error: &Self::Error) -> bool;

    /// The span a statement routed by `decision` to the server named `node` runs in; never the
    /// scope's key. A required method because a span's name must be a literal.
    fn span(node: &str, decision: Decision) -> tracing::Span;

    /// The start-up check of `pool`, bounded by `timeout`. By default, one connection.
    fn check(
        pool: &Self::Pool,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = timeout;
        async move { Self::acquire(pool).await.map(drop) }
    }
}

/// The settings of [`RoutedPools`]; adapters' builders set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Connections per server and role. Default 10; at least 1.
    pub max_connections: u32,
    /// How long a leader connection is waited for. Default 5 s; above zero and at most
    /// [`MAX_TIMING`](crate::MAX_TIMING), or [`connect`](RoutedPools::connect) refuses it.
    pub acquire_timeout: Duration,
    /// How long a follower connection is waited for before the next server is tried. Default
    /// 1 s; bounded as `acquire_timeout`.
    pub follower_acquire_timeout: Duration,
    /// Ask the leader for its WAL position after each write. Default off.
    pub track_commit_position: bool,
    /// Run the health and lag monitor. Default on.
    pub monitor: bool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            follower_acquire_timeout: Duration::from_secs(1),
            track_commit_position: false,
            monitor: true,
        }
    }
}

/// Why [`RoutedPools::connect`] did not start; `E` is the driver's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError<E: std::error::Error + 'static> {
    /// A setting cannot work (a zero timeout).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The router was built for a different number of followers than the configuration has.
    #[error("the router knows {router} followers but the configuration has {config}")]
    RouterMismatch {
        /// Followers in the router.
        router: usize,
        /// Followers in the configuration.
        config: usize,
    },
    /// The leader did not answer the start-up check.
    #[error("the leader is unavailable")]
    LeaderUnavailable(#[source] E),
}

/// Why [`RoutedPools::leader_position`] failed; `E` is the driver's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PositionError<E: std::error::Error + 'static> {
    /// The query failed.
    #[error("the WAL position query failed")]
    Driver(#[source] E),
    /// The answer was not a `pg_lsn`.
    #[error("invalid WAL position")]
    Invalid(#[from] ParseWalPositionError),
}

/// A failed attempt, and where it failed.
#[derive(Debug)]
#[non_exhaustive]
pub struct Failed<E> {
    /// The server the attempt ran on.
    pub target: Target,
    /// Its configured name.
    pub node: String,
    /// What the driver reported.
    pub error: E,
}

const INSERT_LSN: &str = "select pg_current_wal_insert_lsn()::text";
const CURRENT_LSN: &str = "select pg_current_wal_lsn()::text";
const REPLAY_LSN: &str = "select pg_last_wal_replay_lsn()::text";

async fn commit_position<B: Backend>(
    leader: &B::Pool,
) -> Result<WalPosition, PositionError<B::Error>> {
    let text = B::query_lsn(leader, INSERT_LSN)
        .await
        .map_err(PositionError::Driver)?
        .unwrap_or_default();
    // The end of what was written, not past a page header no record has reached yet.
    Ok(text.parse::<WalPosition>()?.written_end())
}

/// Where the server of a read was after it, asked on the read's own connection: an upper bound
/// of what the read returned. `None` when it would not say.
async fn seen_position<B: Backend>(conn: &mut B::Conn, decision: Decision) -> Option<WalPosition> {
    let sql = match decision.target {
        Target::Leader => INSERT_LSN,
        Target::Follower(_) => REPLAY_LSN,
    };
    let text = match B::conn_lsn(conn, sql).await {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(error) => {
            tracing::debug!(%error, "a read's server did not report its position");
            return None;
        }
    };
    let position = text.parse::<WalPosition>().ok()?;
    // On the leader, as for commits: the end of what was written, which followers reach.
    Some(match decision.target {
        Target::Leader => position.written_end(),
        Target::Follower(_) => position,
    })
}

/// Records writes with the router: shared by the pools and the transactions they begin.
pub struct Marker<B: Backend> {
    router: Arc<dyn Router>,
    leader: Arc<B::Pool>,
    track_commit_position: bool,
}

impl<B: Backend> Clone for Marker<B> {
    fn clone(&self) -> Self {
        Self {
            router: self.router.clone(),
            leader: self.leader.clone(),
            track_commit_position: self.track_commit_position,
        }
    }
}

impl<B: Backend> fmt::Debug for Marker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Marker")
            .field("track_commit_position", &self.track_commit_position)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Marker<B> {
    /// Marks `scope` as having written `table`. A failure to store the pin is logged and counted
    /// by the router and not returned: the write itself succeeded, and the rest of this request
    /// reads the leader regardless.
    ///
    /// `committed` is false when the write's outcome is unknown (the connection broke mid-way):
    /// the scope is pinned all the same, without asking a leader that just failed for its
    /// position.
    pub async fn mark(&self, scope: Option<&Scope>, table: Option<&str>, committed: bool) {
        let Some(scope) = scope else { return };
        let position = if self.track_commit_position && committed {
            match commit_position::<B>(&self.leader).await {
                Ok(position) => Some(position),
                Err(error) => {
                    tracing::warn!(%error, "could not read the commit position; pinning to the leader");
                    None
                }
            }
        } else {
            None
        };
        if let Err(error) = self.router.record_write(Some(scope), table, position).await {
            tracing::debug!(%error, "the write succeeded but its pin was not stored");
        }
    }

    /// Marks after a write (or commit) that ended with `outcome`: when it succeeded, or when it
    /// failed with unavailability (it may have committed). A statement error marks nothing.
    ///
    /// # Errors
    /// `outcome`'s error, unchanged.
    pub async fn settle<T>(
        &self,
        scope: Option<&Scope>,
        table: Option<&str>,
        outcome: Result<T, B::Error>,
    ) -> Result<T, B::Error> {
        match &outcome {
            Ok(_) => self.mark(scope, table, true).await,
            Err(error) if B::is_unavailable(error) => self.mark(scope, table, false).await,
            Err(_) => {}
        }
        outcome
    }
}

/// The pools of one leader and its followers, routed by `R` over the driver `B`: what an
/// adapter's routing pool is made of.
pub struct RoutedPools<B: Backend, R> {
    router: Arc<R>,
    config: Config,
    /// Writes and transactions.
    leader: Arc<B::Pool>,
    /// Reads routed to the leader, read-only like every read.
    leader_reads: B::Pool,
    followers: Vec<B::Pool>,
    marker: Marker<B>,
    probe: Arc<ServerProbe<B>>,
    /// Stops the monitor when the pools are dropped.
    _monitor: Option<MonitorHandle>,
}

impl<B: Backend, R> fmt::Debug for RoutedPools<B, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Node's Debug hides passwords; a driver's connect options may not.
        f.debug_struct("RoutedPools")
            .field("leader", self.config.leader())
            .field("followers", &self.config.followers())
            .field("track_commit_position", &self.marker.track_commit_position)
            .finish_non_exhaustive()
    }
}

impl<B: Backend, R: Router + 'static> RoutedPools<B, R> {
    /// Validates `settings`, checks that `router` was built for the followers of `config`,
    /// builds the backend (`backend`: parsing the servers' URLs), then the pools. The leader
    /// must answer within the acquire timeout; a follower that does not answer within the
    /// follower acquire timeout starts marked down (logged with its URL redacted) and is
    /// re-admitted by the monitor, which is given a one-connection pool per server.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ConnectError`] (converted into `E`), or what `backend` failed with.
    pub async fn connect<E>(
        config: Config,
        router: R,
        settings: PoolSettings,
        backend: impl FnOnce(&Config) -> Result<B, E>,
    ) -> Result<Self, E>
    where
        E: From<ConnectError<B::Error>>,
    {
        for (name, value) in [
            ("acquire_timeout", settings.acquire_timeout),
            (
                "follower_acquire_timeout",
                settings.follower_acquire_timeout,
            ),
        ] {
            // Drivers add these to `Instant::now()`: `Duration::MAX` would panic in them.
            if let Err(error) = crate::config::check_timing(name, value) {
                return Err(ConnectError::Config(error).into());
            }
        }
        if router.followers().len() != config.followers().len() {
            return Err(ConnectError::RouterMismatch {
                router: router.followers().len(),
                config: config.followers().len(),
            }
            .into());
        }
        let backend = backend(&config)?;
        let size = settings.max_connections.max(1);
        let (lead, follow) = (settings.acquire_timeout, settings.follower_acquire_timeout);
        let leader = backend.pool(Target::Leader, false, lead, size);
        let leader_reads = backend.pool(Target::Leader, true, lead, size);
        let followers: Vec<B::Pool> = (0..config.followers().len())
            .map(|i| backend.pool(Target::Follower(i), true, follow, size))
            .collect();

        if let Err(error) = B::check(&leader, lead).await {
            tracing::error!(
                leader = %config.leader(),
                %error,
                "the leader is unreachable; the pool does not start"
            );
            return Err(ConnectError::LeaderUnavailable(error).into());
        }
        let router = Arc::new(router);
        let checks = followers.iter().map(|pool| B::check(pool, follow));
        let outcomes = futures_util::future::join_all(checks).await;
        for ((index, node), outcome) in config.followers().iter().enumerate().zip(outcomes) {
            if let Err(error) = outcome {
                tracing::warn!(
                    follower = node.name(),
                    url = %node.redacted_url(),
                    %error,
                    "follower unreachable at start-up; marked down until it answers"
                );
                router.followers().mark_down(index);
            }
        }

        // Its pools connect only when asked: without the monitor, perhaps never.
        let probe = Arc::new(ServerProbe::new(&backend, &config));
        let monitor = settings
            .monitor
            .then(|| spawn_monitor(router.clone(), probe.clone(), config.probe_interval()));
        let leader = Arc::new(leader);
        let marker = Marker {
            router: router.clone(),
            leader: leader.clone(),
            track_commit_position: settings.track_commit_position,
        };
        Ok(Self {
            router,
            config,
            leader,
            leader_reads,
            followers,
            marker,
            probe,
            _monitor: monitor,
        })
    }
}

impl<B: Backend, R> RoutedPools<B, R> {
    /// The router.
    pub fn router(&self) -> &R {
        &self.router
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The leader's pool, for writes.
    pub fn leader(&self) -> &B::Pool {
        &self.leader
    }

    /// The probe the monitor uses.
    pub fn probe(&self) -> &Arc<ServerProbe<B>> {
        &self.probe
    }

    /// What records writes with the router.
    pub fn marker(&self) -> &Marker<B> {
        &self.marker
    }

    /// Whether writes report their WAL position.
    pub fn tracks_commit_position(&self) -> bool {
        self.marker.track_commit_position
    }

    /// The configured name of `target`'s server.
    pub fn node_name(&self, target: Target) -> &str {
        match target {
            Target::Leader => self.config.leader().name(),
            Target::Follower(i) => self.config.followers().get(i).map_or("?", |n| n.name()),
        }
    }

    /// The read pool of `target`.
    pub fn pool_for(&self, target: Target) -> &B::Pool {
        match target {
            Target::Leader => &self.leader_reads,
            Target::Follower(i) => self.followers.get(i).unwrap_or(&self.leader_reads),
        }
    }

    /// The span a statement routed by `decision` runs in.
    pub fn span(&self, decision: Decision) -> tracing::Span {
        B::span(self.node_name(decision.target), decision)
    }
}

impl<B: Backend, R: Router + 'static> RoutedPools<B, R> {
    fn failed(&self, target: Target, error: B::Error) -> Failed<B::Error> {
        Failed {
            target,
            node: self.node_name(target).to_owned(),
            error,
        }
    }

    /// A read connection to the server chosen for the current scope (reading `table`); a
    /// follower that cannot hand one out is marked down and the next server tried.
    ///
    /// When the router [tracks reads](Router::tracks_reads) (monotonic reads), releasing the
    /// connection asks its server where it is now, on that connection, and records it with
    /// the router: see [`Routed`].
    ///
    /// # Errors
    /// The last attempt's failure.
    pub async fn read(&self, table: Option<&str>) -> Result<Routed<B::Conn>, Failed<B::Error>> {
        let scope = current_scope();
        let scope = scope.as_ref();
        read_with_failover(
            &*self.router,
            scope,
            table,
            |(_, error): &(Target, B::Error)| B::is_unavailable(error),
            |decision| {
                let acquire = B::acquire(self.pool_for(decision.target));
                async move {
                    match acquire.await {
                        Ok(conn) => Ok(self.routed(conn, decision, scope, table)),
                        Err(error) => Err((decision.target, error)),
                    }
                }
                .instrument(self.span(decision))
            },
        )
        .await
        .map_err(|(target, error)| self.failed(target, error))
    }

    /// Runs the read `op` on a connection to the server chosen for the current scope; when it
    /// fails because that follower became unreachable, marks it down and runs `op` again on the
    /// next choice.
    ///
    /// # Errors
    /// The last attempt's failure.
    pub async fn read_with<T, F, Fut>(
        &self,
        table: Option<&str>,
        op: F,
    ) -> Result<T, Failed<B::Error>>
    where
        F: FnMut(Routed<B::Conn>) -> Fut,
        Fut: Future<Output = Result<T, B::Error>>,
    {
        let scope = current_scope();
        let scope = scope.as_ref();
        // read_with_failover calls its closure once per attempt; the attempt's future needs
        // `op` too, and a closure cannot lend its own captures to the future it returns.
        let op = Mutex::new(op);
        let op = &op;
        read_with_failover(
            &*self.router,
            scope,
            table,
            |(_, error): &(Target, B::Error)| B::is_unavailable(error),
            |decision| {
                let pool = self.pool_for(decision.target);
                let target = decision.target;
                async move {
                    let conn = B::acquire(pool).await.map_err(|e| (target, e))?;
                    let conn = self.routed(conn, decision, scope, table);
                    let run = {
                        let mut op = op.lock().unwrap_or_else(PoisonError::into_inner);
                        (*op)(conn)
                    };
                    run.await.map_err(|e| (target, e))
                }
                .instrument(self.span(decision))
            },
        )
        .await
        .map_err(|(target, error)| self.failed(target, error))
    }

    /// `conn`, chosen by `decision`; with monotonic reads, one that reports where its server
    /// was after the read when it is released.
    fn routed(
        &self,
        conn: B::Conn,
        decision: Decision,
        scope: Option<&Scope>,
        table: Option<&str>,
    ) -> Routed<B::Conn> {
        let routed = Routed::new(conn, decision);
        let Some(scope) = scope.filter(|_| self.router.tracks_reads()) else {
            return routed;
        };
        // Registered once per request: later reads find it there and clone nothing.
        scope.at_end(|| {
            let ender = self.router.clone();
            Box::new(move |scope| Box::pin(async move { ender.end_request(&scope).await }))
        });
        let router = self.router.clone();
        let scope = scope.clone();
        let table = table.map(str::to_owned);
        let timeout = self.probe.timeout();
        routed.on_release(move |mut conn| {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                // No runtime to ask the server in: the connection goes back unasked, and this
                // request reads the leader from now on.
                scope.raise(None, crate::Freshness::Leader);
                return;
            };
            let owner = scope.clone();
            let record = runtime.spawn(async move {
                let seen = tokio::time::timeout(timeout, seen_position::<B>(&mut conn, decision))
                    .await
                    .ok()
                    .flatten();
                drop(conn);
                router
                    .record_read(&scope, table.as_deref(), decision, seen)
                    .await;
            });
            owner.defer(record);
        })
    }

    /// The current scope and the span of a write to `table`.
    pub fn route_write(&self, table: Option<&str>) -> (Option<Scope>, tracing::Span) {
        let scope = current_scope();
        let decision = self.router.route_write(scope.as_ref(), table);
        (scope, self.span(decision))
    }

    /// Runs `op` on a leader connection; marks the current scope when it succeeds, or when it
    /// failed with unavailability (the write may have committed).
    ///
    /// # Errors
    /// The acquire's or `op`'s error; always from the leader.
    pub async fn write<T, F, Fut>(&self, table: Option<&str>, op: F) -> Result<T, B::Error>
    where
        F: FnOnce(B::Conn) -> Fut,
        Fut: Future<Output = Result<T, B::Error>>,
    {
        let (scope, span) = self.route_write(table);
        async {
            let conn = B::acquire(&self.leader).await?;
            let outcome = op(conn).await;
            self.marker.settle(scope.as_ref(), table, outcome).await
        }
        .instrument(span)
        .await
    }

    /// The leader's current WAL position: the end of what it has written
    /// (`pg_current_wal_insert_lsn()`, see [`WalPosition::written_end`]).
    ///
    /// # Errors
    /// When the leader did not answer, or answered something else than a `pg_lsn`.
    pub async fn leader_position(&self) -> Result<WalPosition, PositionError<B::Error>> {
        commit_position::<B>(&self.leader).await
    }
}

/// A connection to the server the router chose for a read, with the decision that chose it.
/// Adapters hand it out as their `ReadConnection`; it derefs to the driver's connection.
///
/// With monotonic reads, dropping it asks its server (on this connection, so after every
/// statement that ran on it) where it is in the log, and records that with the router as what
/// the scope has seen; the scope's next read, and the end of its request ([`with_scope`]),
/// wait for that record. A read counts once its connection is released.
///
/// ```
/// use distributed_core::{Decision, Reason, Routed, Target};
/// let conn = Routed::new(Box::new(String::from("a connection")), Decision::follower(0, Reason::HealthyFollower));
/// assert_eq!(conn.target(), Target::Follower(0));
/// assert_eq!(conn.len(), 12); // derefs to what the pooled connection derefs to
/// ```
///
/// [`with_scope`]: crate::with_scope
pub struct Routed<C> {
    /// Always `Some` until dropped.
    conn: Option<C>,
    decision: Decision,
    release: Option<Release<C>>,
}

/// What a [`Routed`] does with its connection when dropped.
type Release<C> = Box<dyn FnOnce(C) + Send + Sync>;

impl<C> Routed<C> {
    /// `conn`, chosen by `decision`.
    pub fn new(conn: C, decision: Decision) -> Self {
        Self {
            conn: Some(conn),
            decision,
            release: None,
        }
    }

    /// This connection, handed to `release` instead of dropped when it is dropped.
    #[must_use]
    pub fn on_release(mut self, release: impl FnOnce(C) + Send + Sync + 'static) -> Self {
        self.release = Some(Box::new(release));
        self
    }

    /// Where this read went and why.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// Where this read went.
    pub fn target(&self) -> Target {
        self.decision.target
    }

    /// The pooled connection itself.
    pub fn inner(&self) -> &C {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("a Routed connection is taken only when dropped"),
        }
    }

    fn conn_mut(&mut self) -> &mut C {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("a Routed connection is taken only when dropped"),
        }
    }
}

impl<C> Drop for Routed<C> {
    fn drop(&mut self) {
        if let (Some(conn), Some(release)) = (self.conn.take(), self.release.take()) {
            release(conn);
        }
    }
}

impl<C: std::ops::Deref> std::ops::Deref for Routed<C> {
    type Target = C::Target;

    fn deref(&self) -> &C::Target {
        self.inner()
    }
}

impl<C: std::ops::DerefMut> std::ops::DerefMut for Routed<C> {
    fn deref_mut(&mut self) -> &mut C::Target {
        self.conn_mut()
    }
}

impl<C> fmt::Debug for Routed<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection's own Debug may show its settings (passwords among them).
        f.debug_struct("Routed")
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

/// Asks the servers where they are in the leader's log, for the health and lag monitor and
/// causal mode's on-demand check: `pg_current_wal_lsn()` on the leader,
/// `pg_last_wal_replay_lsn()` on a follower.
///
/// Each server is asked through a pool of its own (one connection, opened when first needed), so
/// a busy read pool never makes a healthy follower look dead. Each query is bounded by the
/// probe interval, or 1 s if that is shorter.
pub struct ServerProbe<B: Backend> {
    leader: B::Pool,
    followers: Vec<B::Pool>,
    timeout: Duration,
}

impl<B: Backend> fmt::Debug for ServerProbe<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pools' connect options would show passwords.
        f.debug_struct("ServerProbe")
            .field("followers", &self.followers.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> ServerProbe<B> {
    /// A probe of the servers of `config`, through pools `backend` builds. Connects only when
    /// asked.
    pub fn new(backend: &B, config: &Config) -> Self {
        let timeout = Self::query_timeout(config);
        Self {
            leader: backend.pool(Target::Leader, false, timeout, 1),
            followers: (0..config.followers().len())
                .map(|i| backend.pool(Target::Follower(i), false, timeout, 1))
                .collect(),
            timeout,
        }
    }

    /// The bound on each query: the probe interval, or 1 s if that is shorter.
    pub fn query_timeout(config: &Config) -> Duration {
        config.probe_interval().max(Duration::from_secs(1))
    }

    /// The bound on each of its queries.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many followers it asks.
    pub fn followers(&self) -> usize {
        self.followers.len()
    }

    async fn position(&self, pool: &B::Pool, sql: &'static str) -> Result<WalPosition, BoxError> {
        let timeout = self.timeout;
        let answer = tokio::time::timeout(timeout, B::query_lsn(pool, sql))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        // pg_last_wal_replay_lsn() is NULL on a server that is not in recovery.
        let text = answer.ok_or("the server reported no WAL position (is it a follower?)")?;
        Ok(text.parse()?)
    }
}

#[async_trait]
impl<B: Backend> NodeProbe for ServerProbe<B> {
    async fn leader_position(&self) -> Result<WalPosition, BoxError> {
        self.position(&self.leader, CURRENT_LSN).await
    }

    async fn follower_position(&self, index: usize) -> Result<WalPosition, BoxError> {
        let pool = self
            .followers
            .get(index)
            .ok_or_else(|| format!("no follower {index}"))?;
        self.position(pool, REPLAY_LSN).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::{DistributedRouter, MemoryCache, Reason, SessionCachedRouter, with_scope};

    #[derive(Debug, PartialEq, thiserror::Error)]
    enum FakeError {
        #[error("server down")]
        Down,
        #[error("bad query")]
        Query,
    }

    /// Servers in memory: index 0 is the leader, 1.. the followers.
    #[derive(Clone)]
    struct Fake {
        up: Arc<Vec<AtomicBool>>,
        lsn: &'static str,
    }

    impl Fake {
        fn new(servers: usize) -> Self {
            Self {
                up: Arc::new((0..servers).map(|_| AtomicBool::new(true)).collect()),
                lsn: "0/16B3748",
            }
        }

        fn set(&self, server: usize, up: bool) {
            self.up[server].store(up, Ordering::SeqCst);
        }
    }

    #[derive(Clone)]
    struct FakePool {
        server: usize,
        fake: Fake,
    }

    impl Backend for Fake {
        type Pool = FakePool;
        type Conn = usize;
        type Error = FakeError;

        fn pool(&self, target: Target, _: bool, _: Duration, _: u32) -> FakePool {
            let server = match target {
                Target::Leader => 0,
                Target::Follower(i) => i + 1,
            };
            FakePool {
                server,
                fake: self.clone(),
            }
        }

        async fn acquire(pool: &FakePool) -> Result<usize, FakeError> {
            if pool.fake.up[pool.server].load(Ordering::SeqCst) {
                Ok(pool.server)
            } else {
                Err(FakeError::Down)
            }
        }

        async fn query_lsn(pool: &FakePool, _: &'static str) -> Result<Option<String>, FakeError> {
            Self::acquire(pool).await?;
            Ok(Some(pool.fake.lsn.to_owned()))
        }

        async fn conn_lsn(_: &mut usize, _: &'static str) -> Result<Option<String>, FakeError> {
            Ok(Some("0/16B3748".to_owned()))
        }

        fn is_unavailable(error: &FakeError) -> bool {
            *error == FakeError::Down
        }

        fn span(node: &str, decision: Decision) -> tracing::Span {
            tracing::debug_span!("fake", node, target_kind = decision.target.kind())
        }
    }

    type TestRouter = DistributedRouter<SessionCachedRouter<MemoryCache>>;

    fn config(followers: usize) -> Config {
        let mut builder = Config::builder().leader("leader", "postgres://app:pw@l/app");
        for i in 0..followers {
            builder = builder.follower(format!("f{i}"), format!("postgres://app:pw@f{i}/app"));
        }
        builder.build().unwrap()
    }

    fn router(config: &Config) -> TestRouter {
        DistributedRouter::new(
            config.clone(),
            SessionCachedRouter::new(MemoryCache::new(), config.lag_window()),
        )
    }

    fn quiet() -> PoolSettings {
        PoolSettings {
            monitor: false,
            ..PoolSettings::default()
        }
    }

    async fn pools(fake: &Fake, followers: usize) -> RoutedPools<Fake, TestRouter> {
        let c = config(followers);
        let r = router(&c);
        let fake = fake.clone();
        RoutedPools::connect(c, r, quiet(), |_| Ok::<_, ConnectError<FakeError>>(fake))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn unusable_settings_and_a_mismatched_router_are_refused_before_building() {
        let built = AtomicBool::new(false);
        let build = |_: &Config| {
            built.store(true, Ordering::SeqCst);
            Ok::<_, ConnectError<FakeError>>(Fake::new(2))
        };
        let zero = PoolSettings {
            follower_acquire_timeout: Duration::ZERO,
            ..quiet()
        };
        let c = config(1);
        let refused = RoutedPools::connect(c.clone(), router(&c), zero, build).await;
        assert!(matches!(
            refused,
            Err(ConnectError::Config(ConfigError::ZeroDuration(
                "follower_acquire_timeout"
            )))
        ));
        let mismatch = RoutedPools::connect(config(2), router(&c), quiet(), build).await;
        assert!(matches!(
            mismatch,
            Err(ConnectError::RouterMismatch {
                router: 1,
                config: 2
            })
        ));
        assert!(!built.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn every_pool_timeout_is_refused_at_zero_and_past_a_day() {
        type Set = fn(&mut PoolSettings, Duration);
        let settings: [(&str, Set); 2] = [
            ("acquire_timeout", |s, d| s.acquire_timeout = d),
            ("follower_acquire_timeout", |s, d| {
                s.follower_acquire_timeout = d
            }),
        ];
        let c = config(1);
        for (name, set) in settings {
            for value in [
                Duration::ZERO,
                crate::MAX_TIMING + Duration::from_nanos(1),
                Duration::MAX,
            ] {
                let mut bad = quiet();
                set(&mut bad, value);
                let build = |_: &Config| Ok::<_, ConnectError<FakeError>>(Fake::new(2));
                let refused = RoutedPools::connect(c.clone(), router(&c), bad, build).await;
                let Err(ConnectError::Config(error)) = refused else {
                    panic!("{name} = {value:?} was accepted");
                };
                assert!(
                    matches!(error, ConfigError::ZeroDuration(n) | ConfigError::DurationTooLong(n, _) if n == name),
                    "{name} = {value:?}: {error:?}"
                );
            }
            let mut longest = quiet();
            set(&mut longest, crate::MAX_TIMING);
            let fake = Fake::new(2);
            let pools = RoutedPools::connect(c.clone(), router(&c), longest, |_| {
                Ok::<_, ConnectError<FakeError>>(fake)
            })
            .await;
            assert!(pools.is_ok(), "{name} = a day");
        }
    }

    #[tokio::test]
    async fn the_leader_must_answer_at_start_and_a_follower_need_not() {
        let fake = Fake::new(3);
        fake.set(0, false);
        let c = config(2);
        let f = fake.clone();
        let down = RoutedPools::connect(c.clone(), router(&c), quiet(), |_| {
            Ok::<_, ConnectError<FakeError>>(f)
        })
        .await;
        assert!(matches!(
            down,
            Err(ConnectError::LeaderUnavailable(FakeError::Down))
        ));

        fake.set(0, true);
        fake.set(2, false);
        let pools = pools(&fake, 2).await;
        let followers = pools.router().followers();
        assert!(followers.is_up(0));
        assert!(!followers.is_up(1), "unreachable at start: marked down");
    }

    #[tokio::test]
    async fn a_follower_failing_under_a_read_is_marked_down_and_the_read_moves_on() {
        let fake = Fake::new(2);
        let pools = pools(&fake, 1).await;
        fake.set(1, false);
        let read = pools.read(None).await.unwrap();
        assert_eq!((*read.inner(), read.target()), (0, Target::Leader));
        assert!(!pools.router().followers().is_up(0));

        // Re-admission ramps up gradually: a fresh set of pools for the second case.
        fake.set(1, true);
        let pools = self::pools(&fake, 1).await;
        let mut attempts = Vec::new();
        let value = pools
            .read_with(None, |conn| {
                let conn = *conn.inner();
                attempts.push(conn);
                async move {
                    if conn == 1 {
                        Err(FakeError::Down)
                    } else {
                        Ok(conn)
                    }
                }
            })
            .await;
        // The follower broke under the statement: marked down, the statement ran again.
        assert_eq!(value.unwrap(), 0);
        assert_eq!(attempts, vec![1, 0]);
        assert!(!pools.router().followers().is_up(0));
    }

    #[tokio::test]
    async fn a_query_error_is_not_retried_and_says_where_it_happened() {
        let fake = Fake::new(2);
        let pools = pools(&fake, 1).await;
        let mut calls = 0;
        let failed = pools
            .read_with(None, |_| {
                calls += 1;
                async { Err::<(), _>(FakeError::Query) }
            })
            .await
            .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(failed.target, Target::Follower(0));
        assert_eq!(failed.node, "f0");
        assert_eq!(failed.error, FakeError::Query);
        assert!(pools.router().followers().is_up(0));
    }

    async fn reason_after_write(outcome: Result<(), FakeError>) -> Reason {
        let expect_ok = outcome.is_ok();
        let fake = Fake::new(2);
        let pools = pools(&fake, 1).await;
        with_scope(Scope::new("s"), async {
            let written = pools.write(Some("posts"), |_| async { outcome }).await;
            assert_eq!(written.is_ok(), expect_ok);
            let scope = current_scope();
            pools
                .router()
                .route_read(scope.as_ref(), Some("posts"))
                .await
                .reason
        })
        .await
    }

    #[tokio::test]
    async fn a_write_marks_its_scope_when_it_succeeds_or_its_outcome_is_unknown() {
        assert_eq!(reason_after_write(Ok(())).await, Reason::RecentWrite);
        assert_eq!(
            reason_after_write(Err(FakeError::Down)).await,
            Reason::RecentWrite,
            "the connection broke: the write may have committed"
        );
        assert_ne!(
            reason_after_write(Err(FakeError::Query)).await,
            Reason::RecentWrite,
            "a refused statement wrote nothing"
        );
    }

    #[tokio::test]
    async fn positions_are_the_end_of_what_was_written_and_probes_bound_their_followers() {
        let fake = Fake::new(2);
        let pools = pools(&fake, 1).await;
        let position = pools.leader_position().await.unwrap();
        assert_eq!(
            position,
            "0/16B3748".parse::<WalPosition>().unwrap().written_end()
        );
        let probe = pools.probe();
        assert_eq!(
            probe.follower_position(0).await.unwrap().to_string(),
            "0/16B3748"
        );
        assert!(probe.follower_position(1).await.is_err());
        fake.set(1, false);
        assert!(probe.follower_position(0).await.is_err());
    }
}
