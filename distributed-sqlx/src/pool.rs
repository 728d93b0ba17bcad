//! The routing pool: a leader pool, one pool per follower, a router deciding between them; the
//! routing itself is `distributed_core`'s [`RoutedPools`], over sqlx.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use distributed_core::{
    Backend, Config, ConnectError, Decision, FollowerSet, Node, PoolSettings, PositionError,
    RoutedPools, Router, Target, WalPosition, force_leader,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult};
use sqlx::{Execute, Executor, PgPool, Postgres};
use tracing::Instrument;

use crate::probe::PgProbe;
use crate::{Error, ReadConnection, Transaction};

/// The session setting every read connection is opened with: a write sent through a read handle
/// fails with SQLSTATE 25006 instead of succeeding unmarked (on the leader) or not at all.
const READ_ONLY: (&str, &str) = ("default_transaction_read_only", "on");

/// The servers' connect options, parsed once: what builds every pool.
pub(crate) struct PgBackend {
    leader: PgConnectOptions,
    followers: Vec<PgConnectOptions>,
}

impl PgBackend {
    pub(crate) fn parse(config: &Config) -> Result<Self, Error> {
        Ok(Self {
            leader: parse(config.leader())?,
            followers: config
                .followers()
                .iter()
                .map(parse)
                .collect::<Result<_, _>>()?,
        })
    }
}

fn parse(node: &Node) -> Result<PgConnectOptions, Error> {
    PgConnectOptions::from_str(node.url()).map_err(|source| Error::InvalidUrl {
        node: node.name().to_owned(),
        source,
    })
}

impl Backend for PgBackend {
    type Pool = PgPool;
    type Conn = PoolConnection<Postgres>;
    type Error = sqlx::Error;

    fn pool(&self, target: Target, read_only: bool, timeout: Duration, size: u32) -> PgPool {
        let options = match target {
            Target::Follower(i) => self.followers.get(i).unwrap_or(&self.leader),
            Target::Leader => &self.leader,
        };
        let options = if read_only {
            options.clone().options([READ_ONLY])
        } else {
            options.clone()
        };
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(timeout)
            .connect_lazy_with(options)
    }

    async fn acquire(pool: &PgPool) -> Result<Self::Conn, sqlx::Error> {
        pool.acquire().await
    }

    async fn query_lsn(pool: &PgPool, sql: &'static str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(sql).fetch_one(pool).await
    }

    async fn conn_lsn(
        conn: &mut Self::Conn,
        sql: &'static str,
    ) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(sql).fetch_one(&mut **conn).await
    }

    fn is_unavailable(error: &sqlx::Error) -> bool {
        crate::error::is_unavailable(error)
    }

    fn span(node: &str, decision: Decision) -> tracing::Span {
        tracing::debug_span!(
            "distributed_sqlx",
            target_kind = decision.target.kind(),
            node,
            reason = decision.reason.label(),
        )
    }
}

/// Records writes with the router: shared by the pool and its transactions.
pub(crate) type Marker = distributed_core::Marker<PgBackend>;

/// A sqlx PostgreSQL pool that routes: writes to the leader, reads to a follower unless the
/// current [scope](distributed_core::current_scope) wrote within the lag window, the followers
/// are down or lagging, or the pin cache cannot tell.
///
/// Cheap to clone (an `Arc`); the health and lag monitor it starts stops when the last clone is
/// dropped.
///
/// | to do this | call | goes to | marks the scope |
/// |---|---|---|---|
/// | read | [`read`](Self::read) (a connection) or [`read_with`](Self::read_with) (a closure, retried elsewhere if a follower fails under it) | the router's choice | no |
/// | read fresh data | [`read_leader`](Self::read_leader) | the leader | no |
/// | write | [`execute`](Self::execute), [`write`](Self::write) | the leader | when it succeeds |
/// | write several statements atomically | [`begin`](Self::begin) | the leader | when it commits |
///
/// [`table`](Self::table) gives the same methods for one table, for routers that pin per table.
pub struct DistributedPool<R> {
    inner: Arc<Inner<R>>,
}

struct Inner<R> {
    pools: RoutedPools<PgBackend, R>,
    /// The monitor's probe, as this crate names it.
    probe: Arc<PgProbe>,
}

impl<R> Clone for DistributedPool<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<R> fmt::Debug for DistributedPool<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Node's Debug hides passwords; sqlx's connect options would not.
        let pools = &self.inner.pools;
        f.debug_struct("DistributedPool")
            .field("leader", pools.config().leader())
            .field("followers", &pools.config().followers())
            .field("track_commit_position", &pools.tracks_commit_position())
            .finish_non_exhaustive()
    }
}

/// Builds a [`DistributedPool`]; every setting has a default, listed on its method.
#[must_use]
pub struct Builder<R> {
    config: Config,
    router: R,
    settings: PoolSettings,
}

impl<R> fmt::Debug for Builder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("max_connections", &s.max_connections)
            .field("acquire_timeout", &s.acquire_timeout)
            .field("follower_acquire_timeout", &s.follower_acquire_timeout)
            .field("track_commit_position", &s.track_commit_position)
            .field("monitor", &s.monitor)
            .finish_non_exhaustive()
    }
}

impl<R: Router + 'static> Builder<R> {
    /// Connections per server and role (the leader has two pools: writes, and reads routed to
    /// it). Default 10; at least 1.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.settings.max_connections = max.max(1);
        self
    }

    /// How long a write (or a read routed to the leader) waits for a leader connection before
    /// failing with [`Error::LeaderUnavailable`]; also bounds the start-up check of the leader.
    /// Default 5 s; zero, or longer than [`MAX_TIMING`](distributed_core::MAX_TIMING) (a day),
    /// makes [`connect`](Self::connect) fail with [`Error::Config`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.settings.acquire_timeout = timeout;
        self
    }

    /// How long a read waits for a follower connection before marking that follower down and
    /// trying the next server. Short, because the read is waiting: default 1 s; bounded as
    /// [`acquire_timeout`](Self::acquire_timeout).
    pub fn follower_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.settings.follower_acquire_timeout = timeout;
        self
    }

    /// After each write, ask the leader for its WAL position (`pg_current_wal_insert_lsn()`, one
    /// extra query) and hand it to [`Router::record_write`], for routers that send a scope's
    /// reads to any follower that has replayed its writes. Default off.
    pub fn track_commit_position(mut self, track: bool) -> Self {
        self.settings.track_commit_position = track;
        self
    }

    /// Run the health and lag monitor ([`spawn_monitor`](distributed_core::spawn_monitor)) with the configuration's probe
    /// interval. Default on; without it, followers marked down stay down.
    pub fn monitor(mut self, monitor: bool) -> Self {
        self.settings.monitor = monitor;
        self
    }

    /// Connects. The leader must answer within the acquire timeout; a follower that does not
    /// answer within the follower acquire timeout starts marked down (and logged, its URL
    /// without password) and is re-admitted by the monitor when it answers.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the leader does not answer; [`Error::InvalidUrl`],
    /// [`Error::Config`] or [`Error::RouterMismatch`] for a configuration that cannot work.
    pub async fn connect(self) -> Result<DistributedPool<R>, Error> {
        let pools =
            RoutedPools::connect(self.config, self.router, self.settings, PgBackend::parse).await?;
        let probe = Arc::new(PgProbe::from_core(pools.probe().clone()));
        Ok(DistributedPool {
            inner: Arc::new(Inner { pools, probe }),
        })
    }
}

impl From<ConnectError<sqlx::Error>> for Error {
    fn from(error: ConnectError<sqlx::Error>) -> Self {
        match error {
            ConnectError::Config(error) => Error::Config(error),
            ConnectError::RouterMismatch { router, config } => {
                Error::RouterMismatch { router, config }
            }
            ConnectError::LeaderUnavailable(error) => Error::LeaderUnavailable(error),
            other => Error::LeaderUnavailable(sqlx::Error::Configuration(other.into())),
        }
    }
}

impl<R: Router + 'static> DistributedPool<R> {
    /// Starts building a pool over the servers of `config`, routed by `router` (which must have
    /// been built from the same configuration).
    pub fn builder(config: Config, router: R) -> Builder<R> {
        Builder {
            config,
            router,
            settings: PoolSettings::default(),
        }
    }

    /// Connects with the default settings; see [`Builder::connect`].
    ///
    /// # Errors
    /// As [`Builder::connect`].
    pub async fn connect(config: Config, router: R) -> Result<Self, Error> {
        Self::builder(config, router).connect().await
    }

    /// The router.
    pub fn router(&self) -> &R {
        self.inner.pools.router()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.inner.pools.config()
    }

    /// The followers' health and lag.
    pub fn followers(&self) -> &FollowerSet {
        self.inner.pools.router().followers()
    }

    /// The probe the health and lag monitor uses (built even when the monitor is off; it
    /// connects only when asked). Hand it to a causal router's on-demand check, which the
    /// router could not be given when it was built, since the pool is built from it:
    ///
    /// ```no_run
    /// use distributed_core::{CausalRouter, CausalTracker, Config, MemoryCache};
    /// use distributed_sqlx::DistributedPool;
    ///
    /// # async fn run(config: Config) -> Result<(), distributed_sqlx::Error> {
    /// let tracker = CausalTracker::new(MemoryCache::new(), config.lag_window());
    /// let pool = DistributedPool::builder(config.clone(), CausalRouter::new(config, tracker))
    ///     .track_commit_position(true)
    ///     .connect()
    ///     .await?;
    /// pool.router().attach_probe(pool.probe());
    /// # Ok(()) }
    /// ```
    pub fn probe(&self) -> Arc<PgProbe> {
        self.inner.probe.clone()
    }

    /// The leader's pool, unrouted: for migrations and administration. Writes sent here do
    /// **not** mark the scope; application writes go through [`write`](Self::write),
    /// [`execute`](Self::execute) or [`begin`](Self::begin).
    pub fn leader(&self) -> &PgPool {
        self.inner.pools.leader()
    }

    /// The same operations for reads and writes of `table`, for routers that pin per table.
    pub fn table<'a>(&'a self, table: &'a str) -> Table<'a, R> {
        Table { pool: self, table }
    }

    /// A read-only connection to the server chosen for the current scope. A follower that
    /// cannot hand out a connection is marked down and the next server is tried, so the caller
    /// does not see its failure. A statement that fails after this returns is the caller's to
    /// retry: [`read_with`](Self::read_with) retries it for you.
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the read ended on the leader and it did not answer.
    pub async fn read(&self) -> Result<ReadConnection, Error> {
        self.read_in(None).await
    }

    /// A read-only connection to the leader, whatever the scope: for code that must see the
    /// latest data (the decision's reason is [`Forced`](distributed_core::Reason::Forced)).
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the leader does not answer.
    pub async fn read_leader(&self) -> Result<ReadConnection, Error> {
        force_leader(self.read_in(None)).await
    }

    /// Runs the read `op` on a connection to the server chosen for the current scope; when it
    /// fails because that follower became unreachable (refused, broken, shutting down), marks
    /// the follower down and runs `op` again on the next choice.
    ///
    /// ```no_run
    /// # async fn demo<R: distributed_core::Router + 'static>(
    /// #     pool: distributed_sqlx::DistributedPool<R>,
    /// # ) -> Result<(), distributed_sqlx::Error> {
    /// let id = 7_i64;
    /// let title: Option<String> = pool
    ///     .read_with(|mut conn| async move {
    ///         sqlx::query_scalar("select title from posts where id = $1")
    ///             .bind(id)
    ///             .fetch_optional(&mut *conn)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The error of the last attempt: a query error, or the leader's unavailability.
    pub async fn read_with<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnMut(ReadConnection) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.read_with_in(None, op).await
    }

    /// Runs `op` on a leader connection; when it succeeds, marks the current scope so its next
    /// reads see the write.
    ///
    /// ```no_run
    /// # async fn demo<R: distributed_core::Router + 'static>(
    /// #     pool: distributed_sqlx::DistributedPool<R>,
    /// # ) -> Result<(), distributed_sqlx::Error> {
    /// let title = String::from("hello");
    /// let id: i64 = pool
    ///     .write(|mut conn| async move {
    ///         sqlx::query_scalar("insert into posts (title) values ($1) returning id")
    ///             .bind(&title)
    ///             .fetch_one(&mut *conn)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when no leader connection could be had within the acquire
    /// timeout or it broke (then the scope is marked anyway: the write may have committed);
    /// [`Error::Database`] when `op` failed.
    pub async fn write<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.write_in(None, op).await
    }

    /// Executes one statement on the leader and marks the current scope when it succeeds.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn execute<'q, Q>(&self, query: Q) -> Result<PgQueryResult, Error>
    where
        Q: Execute<'q, Postgres> + 'q,
    {
        self.execute_in(None, query).await
    }

    /// Begins a transaction on the leader; [`Transaction::commit`] marks the current scope.
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the leader does not answer.
    pub async fn begin(&self) -> Result<Transaction, Error> {
        self.begin_in(None).await
    }

    /// The leader's current WAL position: the end of what it has written
    /// (`pg_current_wal_insert_lsn()`, see [`WalPosition::written_end`]).
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when the leader does not answer.
    pub async fn leader_position(&self) -> Result<WalPosition, Error> {
        self.inner
            .pools
            .leader_position()
            .await
            .map_err(|e| match e {
                PositionError::Invalid(invalid) => Error::InvalidWalPosition(invalid),
                PositionError::Driver(error) => Error::on_leader(error),
                _ => Error::on_leader(sqlx::Error::Protocol(e.to_string())),
            })
    }

    fn failed(failed: distributed_core::Failed<sqlx::Error>) -> Error {
        Error::on(failed.target, &failed.node, failed.error)
    }

    async fn read_in(&self, table: Option<&str>) -> Result<ReadConnection, Error> {
        self.inner.pools.read(table).await.map_err(Self::failed)
    }

    async fn read_with_in<T, F, Fut>(&self, table: Option<&str>, op: F) -> Result<T, Error>
    where
        F: FnMut(ReadConnection) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.inner
            .pools
            .read_with(table, op)
            .await
            .map_err(Self::failed)
    }

    async fn write_in<T, F, Fut>(&self, table: Option<&str>, op: F) -> Result<T, Error>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.inner
            .pools
            .write(table, op)
            .await
            .map_err(Error::on_leader)
    }

    async fn execute_in<'q, Q>(&self, table: Option<&str>, query: Q) -> Result<PgQueryResult, Error>
    where
        Q: Execute<'q, Postgres> + 'q,
    {
        self.write_in(table, |mut conn| async move {
            Executor::execute(&mut *conn, query).await
        })
        .await
    }

    async fn begin_in(&self, table: Option<&str>) -> Result<Transaction, Error> {
        let pools = &self.inner.pools;
        let (scope, span) = pools.route_write(table);
        let tx = pools
            .leader()
            .begin()
            .instrument(span)
            .await
            .map_err(Error::on_leader)?;
        Ok(Transaction::new(
            tx,
            pools.marker().clone(),
            scope,
            table.map(str::to_owned),
        ))
    }
}

/// The operations of [`DistributedPool`] for one table: its pins are per table when the router
/// keeps them so (see `SessionCachedRouter::per_table`); otherwise the same as the pool's.
pub struct Table<'a, R> {
    pool: &'a DistributedPool<R>,
    table: &'a str,
}

impl<R> fmt::Debug for Table<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table").field("table", &self.table).finish()
    }
}

impl<R: Router + 'static> Table<'_, R> {
    /// [`DistributedPool::read`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::read`].
    pub async fn read(&self) -> Result<ReadConnection, Error> {
        self.pool.read_in(Some(self.table)).await
    }

    /// [`DistributedPool::read_leader`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::read_leader`].
    pub async fn read_leader(&self) -> Result<ReadConnection, Error> {
        force_leader(self.pool.read_in(Some(self.table))).await
    }

    /// [`DistributedPool::read_with`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::read_with`].
    pub async fn read_with<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnMut(ReadConnection) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.pool.read_with_in(Some(self.table), op).await
    }

    /// [`DistributedPool::write`] to this table.
    ///
    /// # Errors
    /// As [`DistributedPool::write`].
    pub async fn write<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.pool.write_in(Some(self.table), op).await
    }

    /// [`DistributedPool::execute`] on this table.
    ///
    /// # Errors
    /// As [`DistributedPool::execute`].
    pub async fn execute<'q, Q>(&self, query: Q) -> Result<PgQueryResult, Error>
    where
        Q: Execute<'q, Postgres> + 'q,
    {
        self.pool.execute_in(Some(self.table), query).await
    }

    /// [`DistributedPool::begin`] for this table.
    ///
    /// # Errors
    /// As [`DistributedPool::begin`].
    pub async fn begin(&self) -> Result<Transaction, Error> {
        self.pool.begin_in(Some(self.table)).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use distributed_core::{
        Config, ConfigError, DistributedRouter, MemoryCache, SessionCachedRouter,
    };

    use super::*;

    type TestRouter = DistributedRouter<SessionCachedRouter<MemoryCache>>;

    fn config(followers: usize) -> Config {
        let mut builder =
            Config::builder().leader("leader", "postgres://app:hunter2@127.0.0.1:1/app");
        for i in 0..followers {
            builder = builder.follower(
                format!("f{i}"),
                format!("postgres://app:hunter2@127.0.0.1:{}/app", i + 2),
            );
        }
        builder.build().unwrap()
    }

    fn router(config: &Config) -> TestRouter {
        DistributedRouter::new(
            config.clone(),
            SessionCachedRouter::new(MemoryCache::new(), config.lag_window()),
        )
    }

    #[tokio::test]
    async fn unusable_settings_are_refused_before_connecting() {
        let c = config(1);
        let zero = DistributedPool::builder(c.clone(), router(&c))
            .follower_acquire_timeout(Duration::ZERO)
            .connect()
            .await;
        assert!(matches!(
            zero,
            Err(Error::Config(ConfigError::ZeroDuration(
                "follower_acquire_timeout"
            )))
        ));
        let mismatch = DistributedPool::connect(config(2), router(&c)).await;
        assert!(matches!(
            mismatch,
            Err(Error::RouterMismatch {
                router: 1,
                config: 2
            })
        ));
        let bad_url = Config::builder()
            .leader("leader", "postgres://h:notaport/db")
            .build()
            .unwrap();
        let refused = DistributedPool::connect(bad_url.clone(), router(&bad_url)).await;
        assert!(matches!(refused, Err(Error::InvalidUrl { node, .. }) if node == "leader"));
    }

    /// Both timeouts through zero and `Duration::MAX`: a typed error from `connect()`, never a
    /// panic in the driver (`Instant::now() + Duration::MAX`).
    #[tokio::test]
    async fn every_timeout_is_refused_at_zero_and_at_max() {
        type Set = fn(Builder<TestRouter>, Duration) -> Builder<TestRouter>;
        let settings: [(&str, Set); 2] = [
            ("acquire_timeout", Builder::acquire_timeout),
            (
                "follower_acquire_timeout",
                Builder::follower_acquire_timeout,
            ),
        ];
        let c = config(1);
        for (name, set) in settings {
            for value in [Duration::ZERO, Duration::MAX] {
                let builder = set(DistributedPool::builder(c.clone(), router(&c)), value);
                let refused = builder.connect().await;
                assert!(
                    matches!(
                        &refused,
                        Err(Error::Config(
                            ConfigError::ZeroDuration(n) | ConfigError::DurationTooLong(n, _)
                        )) if *n == name
                    ),
                    "{name} = {value:?}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn debug_never_shows_a_password() {
        let c = config(1);
        let shown = format!("{:?}", DistributedPool::builder(c.clone(), router(&c)));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
