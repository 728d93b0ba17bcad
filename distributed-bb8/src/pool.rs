//! The routing pool: a leader pool, one pool per follower, a router deciding between them; the
//! routing itself is `distributed_core`'s [`RoutedPools`], over bb8.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bb8::RunError;
use bb8_postgres::PostgresConnectionManager;
use distributed_core::{
    Backend, Config, ConnectError, Decision, FollowerSet, Node, PoolSettings, PositionError,
    RoutedPools, Router, Target, WalPosition, force_leader,
};
use futures_util::TryFutureExt;
use futures_util::future::BoxFuture;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tracing::Instrument;

use crate::probe::PgProbe;
use crate::{Connection, Error, Manager, ReadConnection};

/// The option every read connection is opened with: a write sent through a read handle fails
/// with SQLSTATE 25006 instead of succeeding unmarked (on the leader) or not at all.
const READ_ONLY: &str = "-c default_transaction_read_only=on";

/// Statement parameters, as `tokio_postgres` takes them.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The servers' connection configurations, parsed once: what builds every pool.
pub(crate) struct PgBackend {
    leader: tokio_postgres::Config,
    followers: Vec<tokio_postgres::Config>,
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

fn parse(node: &Node) -> Result<tokio_postgres::Config, Error> {
    tokio_postgres::Config::from_str(node.url()).map_err(|source| Error::InvalidUrl {
        node: node.name().to_owned(),
        source,
    })
}

fn read_only(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut config = config.clone();
    let options = match config.get_options() {
        Some(options) if !options.trim().is_empty() => format!("{options} {READ_ONLY}"),
        _ => READ_ONLY.to_owned(),
    };
    config.options(&options);
    config
}

impl Backend for PgBackend {
    type Pool = bb8::Pool<Manager>;
    type Conn = Connection;
    type Error = RunError<tokio_postgres::Error>;

    fn pool(&self, target: Target, read_only: bool, timeout: Duration, size: u32) -> Self::Pool {
        let config = match target {
            Target::Follower(i) => self.followers.get(i).unwrap_or(&self.leader),
            Target::Leader => &self.leader,
        };
        let mut config = config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        if read_only {
            config = self::read_only(&config);
        }
        bb8::Pool::builder()
            .max_size(size)
            .connection_timeout(timeout)
            // A server that refuses connections is down: say so at once instead of retrying
            // until the timeout, so reads move on to the next server.
            .retry_connection(false)
            .build_unchecked(PostgresConnectionManager::new(config, NoTls))
    }

    async fn acquire(pool: &Self::Pool) -> Result<Connection, Self::Error> {
        pool.get_owned().await
    }

    /// A dedicated connection reports why it failed; a pool checkout would only time out.
    async fn check(pool: &Self::Pool, timeout: Duration) -> Result<(), Self::Error> {
        match tokio::time::timeout(timeout, pool.dedicated_connection()).await {
            Ok(Ok(_client)) => Ok(()),
            Ok(Err(error)) => Err(RunError::User(error)),
            Err(_) => Err(RunError::TimedOut),
        }
    }

    async fn query_lsn(
        pool: &Self::Pool,
        sql: &'static str,
    ) -> Result<Option<String>, Self::Error> {
        let conn = pool.get().await?;
        let row = conn.query_one(sql, &[]).await?;
        Ok(row.try_get(0)?)
    }

    async fn conn_lsn(
        conn: &mut Self::Conn,
        sql: &'static str,
    ) -> Result<Option<String>, Self::Error> {
        let row = conn.query_one(sql, &[]).await?;
        Ok(row.try_get(0)?)
    }

    fn is_unavailable(error: &Self::Error) -> bool {
        crate::error::is_unavailable(error)
    }

    fn span(node: &str, decision: Decision) -> tracing::Span {
        tracing::debug_span!(
            "distributed_bb8",
            target_kind = decision.target.kind(),
            node,
            reason = decision.reason.label(),
        )
    }
}

/// A bb8 pool of `tokio_postgres` connections that routes: writes to the leader, reads to a
/// follower unless the current [scope](distributed_core::current_scope) wrote within the lag
/// window, the followers are down or lagging, or the pin cache cannot tell.
///
/// Cheap to clone (an `Arc`); the health and lag monitor it starts stops when the last clone is
/// dropped.
///
/// | to do this | call | goes to | marks the scope |
/// |---|---|---|---|
/// | read | [`query`](Self::query), [`query_one`](Self::query_one), [`query_opt`](Self::query_opt), [`read_with`](Self::read_with) (retried elsewhere if a follower fails under them), or [`read`](Self::read) (a connection) | the router's choice | no |
/// | read fresh data | [`read_leader`](Self::read_leader) | the leader | no |
/// | write | [`execute`](Self::execute), [`write`](Self::write) | the leader | when it succeeds |
/// | write several statements atomically | [`transaction`](Self::transaction) | the leader | when it commits |
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
    /// failing with [`Error::LeaderUnavailable`]; also bounds the start-up check of the leader
    /// and each connection attempt. Default 5 s.
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

impl From<ConnectError<RunError<tokio_postgres::Error>>> for Error {
    fn from(error: ConnectError<RunError<tokio_postgres::Error>>) -> Self {
        match error {
            ConnectError::Config(error) => Error::Config(error),
            ConnectError::RouterMismatch { router, config } => {
                Error::RouterMismatch { router, config }
            }
            ConnectError::LeaderUnavailable(error) => Error::LeaderUnavailable(error),
            _ => Error::LeaderUnavailable(RunError::TimedOut),
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
    /// use distributed_bb8::DistributedPool;
    /// use distributed_core::{CausalRouter, CausalTracker, Config, MemoryCache};
    ///
    /// # async fn run(config: Config) -> Result<(), distributed_bb8::Error> {
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
    /// **not** mark the scope; application writes go through [`execute`](Self::execute),
    /// [`write`](Self::write) or [`transaction`](Self::transaction).
    pub fn leader(&self) -> &bb8::Pool<Manager> {
        self.inner.pools.leader()
    }

    /// The same operations for reads and writes of `table`, for routers that pin per table.
    pub fn table<'a>(&'a self, table: &'a str) -> Table<'a, R> {
        Table { pool: self, table }
    }

    /// A read-only connection to the server chosen for the current scope. A follower that
    /// cannot hand out a connection is marked down and the next server is tried, so the caller
    /// does not see its failure. A statement that fails after this returns is the caller's to
    /// retry: [`query`](Self::query) and [`read_with`](Self::read_with) retry it for you.
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
    /// # Errors
    /// The error of the last attempt: a query error, or the leader's unavailability.
    pub async fn read_with<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnMut(ReadConnection) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.read_with_in(None, op).await
    }

    /// [`Client::query`](tokio_postgres::Client::query) through [`read_with`](Self::read_with).
    ///
    /// # Errors
    /// As [`read_with`](Self::read_with).
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
        self.read_with(|conn| async move { conn.query(sql, params).await })
            .await
    }

    /// [`Client::query_one`](tokio_postgres::Client::query_one) through
    /// [`read_with`](Self::read_with).
    ///
    /// # Errors
    /// As [`read_with`](Self::read_with); [`Error::Database`] unless exactly one row came back.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        self.read_with(|conn| async move { conn.query_one(sql, params).await })
            .await
    }

    /// [`Client::query_opt`](tokio_postgres::Client::query_opt) through
    /// [`read_with`](Self::read_with).
    ///
    /// # Errors
    /// As [`read_with`](Self::read_with); [`Error::Database`] when more than one row came back.
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        self.read_with(|conn| async move { conn.query_opt(sql, params).await })
            .await
    }

    /// Runs `op` on a leader connection; when it succeeds, marks the current scope so its next
    /// reads see the write.
    ///
    /// # Errors
    /// [`Error::LeaderUnavailable`] when no leader connection could be had within the acquire
    /// timeout or it broke (then the scope is marked anyway: the write may have committed);
    /// [`Error::Database`] when `op` failed.
    pub async fn write<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.write_in(None, op).await
    }

    /// Executes one statement on the leader and marks the current scope when it succeeds;
    /// returns the number of rows it changed.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
        self.write_in(None, |conn| async move { conn.execute(sql, params).await })
            .await
    }

    /// Runs `op` in a transaction on the leader, commits when it returns `Ok` and then marks the
    /// current scope; rolls back when it returns `Err`.
    ///
    /// ```no_run
    /// # async fn demo<R: distributed_core::Router + 'static>(
    /// #     pool: distributed_bb8::DistributedPool<R>,
    /// # ) -> Result<(), distributed_bb8::Error> {
    /// let (from, to) = (1_i64, 2_i64);
    /// pool.transaction(|tx| {
    ///     Box::pin(async move {
    ///         tx.execute("update accounts set balance = balance - 10 where id = $1", &[&from])
    ///             .await?;
    ///         tx.execute("update accounts set balance = balance + 10 where id = $1", &[&to])
    ///             .await?;
    ///         Ok::<_, distributed_bb8::Error>(())
    ///     })
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// What `op` returned; or [`Error::LeaderUnavailable`] / [`Error::Database`] (converted
    /// into `E`) when the transaction could not begin or commit.
    pub async fn transaction<T, E, F>(&self, op: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut tokio_postgres::Transaction<'_>) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        self.transaction_in(None, op).await
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
                _ => Error::on_leader(RunError::TimedOut),
            })
    }

    fn failed(failed: distributed_core::Failed<RunError<tokio_postgres::Error>>) -> Error {
        Error::on(failed.target, &failed.node, failed.error)
    }

    async fn read_in(&self, table: Option<&str>) -> Result<ReadConnection, Error> {
        self.inner.pools.read(table).await.map_err(Self::failed)
    }

    async fn read_with_in<T, F, Fut>(&self, table: Option<&str>, mut op: F) -> Result<T, Error>
    where
        F: FnMut(ReadConnection) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.inner
            .pools
            .read_with(table, |conn| op(conn).map_err(RunError::User))
            .await
            .map_err(Self::failed)
    }

    async fn write_in<T, F, Fut>(&self, table: Option<&str>, op: F) -> Result<T, Error>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.inner
            .pools
            .write(table, |conn| op(conn).map_err(RunError::User))
            .await
            .map_err(Error::on_leader)
    }

    async fn transaction_in<T, E, F>(&self, table: Option<&str>, op: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut tokio_postgres::Transaction<'_>) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        let pools = &self.inner.pools;
        let (scope, span) = pools.route_write(table);
        let leader_error = |error| E::from(Error::on_leader(RunError::User(error)));
        async {
            let mut conn = pools
                .leader()
                .get()
                .await
                .map_err(|e| E::from(Error::on_leader(e)))?;
            let mut tx = conn.transaction().await.map_err(leader_error)?;
            let value = match op(&mut tx).await {
                Ok(value) => value,
                Err(error) => {
                    // A failed rollback is the server's to finish when the connection closes.
                    let _ = tx.rollback().await;
                    return Err(error);
                }
            };
            let committed = tx.commit().await;
            // Back to the pool before marking: reading the commit position takes a leader
            // connection too, and writers each holding one while waiting for a second would
            // starve the pool.
            drop(conn);
            let outcome = committed.map(|()| value).map_err(RunError::User);
            pools
                .marker()
                .settle(scope.as_ref(), table, outcome)
                .await
                .map_err(|e| E::from(Error::on_leader(e)))
        }
        .instrument(span)
        .await
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
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.pool.read_with_in(Some(self.table), op).await
    }

    /// [`DistributedPool::query`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::query`].
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
        self.read_with(|conn| async move { conn.query(sql, params).await })
            .await
    }

    /// [`DistributedPool::query_one`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::query_one`].
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        self.read_with(|conn| async move { conn.query_one(sql, params).await })
            .await
    }

    /// [`DistributedPool::query_opt`] of this table.
    ///
    /// # Errors
    /// As [`DistributedPool::query_opt`].
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        self.read_with(|conn| async move { conn.query_opt(sql, params).await })
            .await
    }

    /// [`DistributedPool::write`] to this table.
    ///
    /// # Errors
    /// As [`DistributedPool::write`].
    pub async fn write<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.pool.write_in(Some(self.table), op).await
    }

    /// [`DistributedPool::execute`] on this table.
    ///
    /// # Errors
    /// As [`DistributedPool::execute`].
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
        self.pool
            .write_in(Some(self.table), |conn| async move {
                conn.execute(sql, params).await
            })
            .await
    }

    /// [`DistributedPool::transaction`] on this table.
    ///
    /// # Errors
    /// As [`DistributedPool::transaction`].
    pub async fn transaction<T, E, F>(&self, op: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut tokio_postgres::Transaction<'_>) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        self.pool.transaction_in(Some(self.table), op).await
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

#[cfg(test)]
mod read_only_tests {
    use super::*;

    #[test]
    fn read_only_is_added_to_existing_options() {
        let plain: tokio_postgres::Config = "host=h user=u".parse().unwrap();
        assert_eq!(read_only(&plain).get_options(), Some(READ_ONLY));
        let with: tokio_postgres::Config = "host=h options='-c search_path=app'".parse().unwrap();
        assert_eq!(
            read_only(&with).get_options(),
            Some("-c search_path=app -c default_transaction_read_only=on")
        );
    }
}
