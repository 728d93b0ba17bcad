//! The live demo behind `cargo xtask demo`: a small axum app that routes its reads with
//! `distributed-sqlx`, keeps its sessions in the write-behind `distributed-session` store and
//! its pins and sessions in memcached, driven by a scripted client, against a real leader and
//! lagging followers.
//!
//! Its handlers never name a scope, a session id or a server: `SessionScopeLayer` scopes each
//! request by its session cookie, `tower_sessions` runs the sessions on the write-behind store,
//! and the pool asks the router. The client checks every read of its own writes; the app
//! counts where every read went and why.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use distributed_demo::{DemoOptions, Mode};
//!
//! let options = DemoOptions::from_env(Mode::Causal)?;
//! let report = distributed_demo::run(&options, |live| println!("{}", live.row())).await?;
//! println!("{}", report.summary());
//! # Ok(()) }
//! ```

mod app;
mod client;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use distributed_core::{
    CausalRouter, CausalTracker, Config, DistributedRouter, Router, SessionCachedRouter,
};
use distributed_memcache::MemcacheCache;
use distributed_session::{
    PgSessions, PinCarrier, SessionDatabase, SessionScopeLayer, WriteBehindStore,
};
use distributed_sqlx::{DistributedPool, sqlx};
use distributed_testkit::env;
use tokio::time::Instant;
use tower_sessions::SessionManagerLayer;

pub use stats::Report;

use crate::app::{AppState, SCHEMA};
use crate::stats::{ClientStats, ServerStats};

/// How reads of a scope's own writes are kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pin a scope to the leader for the lag window after it writes (the original's way).
    Time,
    /// Remember the WAL position of a scope's last write; read any follower that replayed it.
    Causal,
}

impl Mode {
    /// `"time"` or `"causal"`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Time => "time",
            Mode::Causal => "causal",
        }
    }
}

/// Where the servers are and how the run goes.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The leader's URL.
    pub leader_url: String,
    /// The followers' URLs (at least one).
    pub follower_urls: Vec<String>,
    /// memcached, `host:port`.
    pub memcached_addr: String,
    /// The consistency mode.
    pub mode: Mode,
    /// How long the client runs.
    pub duration: Duration,
    /// How many sessions run at once.
    pub sessions: usize,
    /// The share of a session's requests that post (the rest browse).
    pub post_share: f64,
    /// The lag window.
    pub lag_window: Duration,
    /// Causal mode only: also never read a follower behind what the session read before.
    pub monotonic_reads: bool,
}

impl DemoOptions {
    /// Servers from the variables `cargo xtask` sets (see `distributed_testkit::env`), and the
    /// defaults: 20 s, 12 sessions, one request in ten a post, a 2 s lag window.
    ///
    /// # Errors
    /// When a variable is missing.
    pub fn from_env(mode: Mode) -> anyhow::Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .with_context(|| format!("{name} is not set: run `cargo xtask demo`"))
        };
        let follower_urls: Vec<String> = var(env::FOLLOWER_URLS)?
            .split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if follower_urls.is_empty() {
            bail!("the demo needs at least one follower");
        }
        Ok(Self {
            leader_url: var(env::LEADER_URL)?,
            follower_urls,
            memcached_addr: var(env::MEMCACHED_ADDR)?,
            mode,
            duration: Duration::from_secs(20),
            sessions: 12,
            post_share: 0.1,
            lag_window: Duration::from_secs(2),
            monotonic_reads: false,
        })
    }
}

/// Runs the demo: starts the app on a free port, runs the client, calls `live` about every
/// two seconds with the figures so far, and returns the final ones.
///
/// # Errors
/// When a server cannot be reached or the app cannot start. Failed requests are counted, not
/// returned.
pub async fn run(options: &DemoOptions, live: impl FnMut(&Report)) -> anyhow::Result<Report> {
    let mut config = Config::builder()
        .leader("leader", &options.leader_url)
        .lag_window(options.lag_window)
        .probe_interval(Duration::from_millis(200))
        .readmit_ramp(Duration::from_secs(2));
    for (i, url) in options.follower_urls.iter().enumerate() {
        config = config.follower(format!("follower-{}", i + 1), url);
    }
    let config = config.build()?;
    let cache = MemcacheCache::builder()
        .server(&options.memcached_addr)
        .namespace("demo")
        .build()?;
    match options.mode {
        Mode::Time => {
            let pins = SessionCachedRouter::new(cache.clone(), config.lag_window());
            let router = Arc::new(DistributedRouter::new(config.clone(), pins));
            serve_and_drive(options, config, router, cache, |_| {}, live).await
        }
        Mode::Causal => {
            let tracker = CausalTracker::new(cache.clone(), config.lag_window())
                .monotonic_reads(options.monotonic_reads);
            let router = Arc::new(CausalRouter::new(config.clone(), tracker));
            // When the monitor's last look is too old to say, ask a follower on demand.
            let attach = |pool: &DistributedPool<Arc<CausalRouter<MemcacheCache>>>| {
                pool.router().attach_probe(pool.probe());
            };
            serve_and_drive(options, config, router, cache, attach, live).await
        }
    }
}

/// The schema reaches the followers a replication delay after the leader creates it; the
/// demo starts once every follower has it.
async fn wait_for_schema(follower_urls: &[String]) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in follower_urls {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        loop {
            let ready: bool = sqlx::query_scalar("SELECT to_regclass('demo_posts') IS NOT NULL")
                .fetch_one(&mut conn)
                .await?;
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("the demo tables did not reach a follower within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conn.close().await?;
    }
    Ok(())
}

async fn serve_and_drive<R>(
    options: &DemoOptions,
    config: Config,
    router: Arc<R>,
    cache: MemcacheCache,
    attach: impl FnOnce(&DistributedPool<Arc<R>>),
    mut live: impl FnMut(&Report),
) -> anyhow::Result<Report>
where
    R: Router + 'static,
{
    let pool = DistributedPool::builder(config, router.clone())
        .track_commit_position(options.mode == Mode::Causal)
        .max_connections(8)
        .connect()
        .await?;
    attach(&pool);
    sqlx::raw_sql(SCHEMA).execute(pool.leader()).await?;
    let sessions_db = PgSessions::new(pool.leader().clone());
    sessions_db.migrate().await?;
    let carrier: Arc<dyn PinCarrier> = router;
    let store = WriteBehindStore::builder(cache, sessions_db)
        .carry_pins(carrier)
        .build()?;
    let naive = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&options.follower_urls[0])
        .await?;
    wait_for_schema(&options.follower_urls).await?;

    let server = Arc::new(ServerStats::default());
    let state = Arc::new(AppState {
        pool,
        naive,
        stats: server.clone(),
    });
    let web = app::app(state)
        .layer(SessionManagerLayer::new(store.clone()).with_secure(false))
        .layer(SessionScopeLayer::new());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, web)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    let client = Arc::new(ClientStats::default());
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..options.sessions {
        let client = client.clone();
        let post_share = options.post_share;
        sessions.spawn(client::session(addr, deadline, post_share, client));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    let mode = options.mode.name();
    loop {
        tokio::select! {
            joined = sessions.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    ClientStats::add(&client.errors);
                    eprintln!("demo client: a session failed: {e:#}");
                }
                Some(Err(e)) => bail!("a client session panicked: {e}"),
            },
            _ = ticker.tick() => live(&Report::new(mode, started.elapsed(), &client, &server)),
        }
    }
    let report = Report::new(mode, started.elapsed(), &client, &server);
    let _ = stop.send(());
    serving.await??;
    store.shutdown().await?;
    Ok(report)
}
