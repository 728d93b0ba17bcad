//! A private set of servers: one leader, lagging followers, optionally memcached and Redis.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    EnvRig, RigError,
    cache_server::{CacheKind, CacheServer},
    env,
    postgres::{Node, PgCluster, postgres_bin_dir},
    process::{self, RunAs},
};

/// What [`Topology::start`] starts.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// How many streaming followers (default 2).
    pub followers: usize,
    /// `recovery_min_apply_delay` of every follower (default 1 s): how far behind they read.
    pub apply_delay: Duration,
    /// One apply delay per follower, overriding `apply_delay`; followers beyond its length use
    /// `apply_delay`.
    pub per_follower_apply_delay: Option<Vec<Duration>>,
    /// Start a memcached.
    pub memcached: bool,
    /// Start a Redis.
    pub redis: bool,
    /// Where the rig directory is created (default: the system temp directory).
    pub parent_dir: Option<PathBuf>,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            followers: 2,
            apply_delay: Duration::from_secs(1),
            per_follower_apply_delay: None,
            memcached: false,
            redis: false,
            parent_dir: None,
        }
    }
}

impl TopologyOptions {
    fn apply_delays(&self) -> Vec<Duration> {
        (0..self.followers)
            .map(|i| {
                self.per_follower_apply_delay
                    .as_ref()
                    .and_then(|delays| delays.get(i).copied())
                    .unwrap_or(self.apply_delay)
            })
            .collect()
    }
}

/// Servers started by this process, in a fresh directory; dropping it stops them all and removes
/// the directory (also when a test panics).
///
/// The directory layout is the one documented at the crate root. Fault controls take `&self`, so a
/// topology can be shared between tasks behind an `Arc`.
#[derive(Debug)]
pub struct Topology {
    cluster: PgCluster,
    leader_url: String,
    follower_urls: Vec<String>,
    redis_url: Option<String>,
    apply_delays: Vec<Duration>,
    memcached: Option<CacheServer>,
    redis: Option<CacheServer>,
    /// Cleared by `detach`: then nothing is stopped or removed.
    owned: bool,
}

impl Topology {
    /// The topology the xtask started, from the environment; see [`EnvRig::from_env`].
    pub fn from_env() -> Result<Option<EnvRig>, RigError> {
        EnvRig::from_env()
    }

    /// Starts a leader, `opts.followers` followers streaming from it with their apply delay, and
    /// the cache servers asked for; returns once every follower is in recovery and streaming and
    /// every cache server answers.
    pub async fn start(opts: TopologyOptions) -> Result<Self, RigError> {
        // A port found free can be taken (by another test's outgoing connection, say) before our
        // server binds it; a fresh set of ports nearly always does it.
        let mut attempts_left = 3;
        loop {
            attempts_left -= 1;
            match Self::start_once(&opts).await {
                Err(e) if e.is_port_clash() && attempts_left > 0 => continue,
                outcome => return outcome,
            }
        }
    }

    async fn start_once(opts: &TopologyOptions) -> Result<Self, RigError> {
        let bin = postgres_bin_dir()?;
        let run_as = RunAs::detect()?;
        let parent = opts.parent_dir.clone().unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&parent).map_err(|e| RigError::io("creating", &parent, e))?;
        let leader_port = process::free_port()?;
        let mut follower_ports = Vec::with_capacity(opts.followers);
        for _ in 0..opts.followers {
            follower_ports.push(process::free_port()?);
        }
        let dir = tempfile::Builder::new()
            .prefix("distributed-rig-")
            .tempdir_in(&parent)
            .map_err(|e| RigError::io("creating a rig directory in", &parent, e))?
            .keep();
        // From here on, an early return drops `rig`, which stops what was started and removes
        // the directory.
        let cluster = PgCluster {
            bin,
            dir,
            run_as,
            leader_port,
            follower_ports,
        };
        let mut rig = Self {
            leader_url: cluster.url(Node::Leader),
            follower_urls: (0..opts.followers)
                .map(|i| cluster.url(Node::Follower(i)))
                .collect(),
            redis_url: None,
            cluster,
            apply_delays: opts.apply_delays(),
            memcached: None,
            redis: None,
            owned: true,
        };
        rig.cluster.run_as.chown(&rig.cluster.dir)?;
        rig.cluster.init_leader().await?;
        rig.cluster.start(Node::Leader).await?;
        for (index, delay) in rig.apply_delays.iter().enumerate() {
            rig.cluster.make_follower(index, *delay).await?;
            rig.cluster.start(Node::Follower(index)).await?;
        }
        for index in 0..rig.apply_delays.len() {
            rig.cluster.wait_streaming(index).await?;
        }
        if opts.memcached {
            let memcached = rig
                .memcached
                .insert(CacheServer::new(CacheKind::Memcached, rig.dir())?);
            memcached.start().await?;
        }
        if opts.redis {
            let redis = rig
                .redis
                .insert(CacheServer::new(CacheKind::Redis, rig.dir())?);
            redis.start().await?;
            rig.redis_url = Some(format!("redis://{}", redis.addr()));
        }
        Ok(rig)
    }

    /// The rig directory.
    pub fn dir(&self) -> &Path {
        &self.cluster.dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` of the leader.
    pub fn leader_url(&self) -> &str {
        &self.leader_url
    }

    /// The followers' URLs, follower 0 first.
    pub fn follower_urls(&self) -> &[String] {
        &self.follower_urls
    }

    /// Each follower's apply delay, follower 0 first.
    pub fn apply_delays(&self) -> &[Duration] {
        &self.apply_delays
    }

    /// `127.0.0.1:PORT` of memcached, if one was asked for.
    pub fn memcached_addr(&self) -> Option<&str> {
        self.memcached.as_ref().map(CacheServer::addr)
    }

    /// `redis://127.0.0.1:PORT` of Redis, if one was asked for.
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref()
    }

    /// The environment variables that describe this topology to [`EnvRig`]
    /// (everything but [`env::REQUIRE_RIG`]). `DISTRIBUTED_APPLY_DELAY_MS` is the largest delay.
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        let max_delay = self.apply_delays.iter().max().copied().unwrap_or_default();
        let mut vars = vec![
            (env::LEADER_URL, self.leader_url.clone()),
            (env::FOLLOWER_URLS, self.follower_urls().join(",")),
            (env::RIG_DIR, self.dir().display().to_string()),
            (env::APPLY_DELAY_MS, max_delay.as_millis().to_string()),
            (env::PG_BIN_DIR, self.cluster.bin.display().to_string()),
        ];
        if let Some(addr) = self.memcached_addr() {
            vars.push((env::MEMCACHED_ADDR, addr.to_owned()));
        }
        if let Some(url) = self.redis_url() {
            vars.push((env::REDIS_URL, url.to_owned()));
        }
        vars
    }

    /// Pids of the servers running right now (postmasters, memcached, Redis).
    pub fn pids(&self) -> Vec<u32> {
        let caches = [&self.memcached, &self.redis]
            .into_iter()
            .flatten()
            .filter_map(CacheServer::pid);
        self.cluster.pids().into_iter().chain(caches).collect()
    }

    /// Crashes follower `index` (`pg_ctl stop -m immediate`).
    pub async fn stop_follower(&self, index: usize) -> Result<(), RigError> {
        self.cluster.stop_follower(index).await
    }

    /// Starts follower `index` again and waits until it streams.
    pub async fn start_follower(&self, index: usize) -> Result<(), RigError> {
        self.cluster.start_follower(index).await
    }

    /// Crashes the leader (`pg_ctl stop -m immediate`); followers keep serving stale reads.
    pub async fn stop_leader(&self) -> Result<(), RigError> {
        self.cluster.stop(Node::Leader).await
    }

    /// Starts the leader again and waits until every running follower streams from it again.
    pub async fn start_leader(&self) -> Result<(), RigError> {
        self.cluster.start_leader().await
    }

    /// Freezes what follower `index` shows (`pg_wal_replay_pause()`); it keeps receiving WAL.
    pub async fn pause_follower_replay(&self, index: usize) -> Result<(), RigError> {
        self.cluster.set_replay_paused(index, true).await
    }

    /// Lets follower `index` catch up again (`pg_wal_replay_resume()`).
    pub async fn resume_follower_replay(&self, index: usize) -> Result<(), RigError> {
        self.cluster.set_replay_paused(index, false).await
    }

    /// Kills memcached; its contents are lost, as in a real crash.
    pub fn stop_memcached(&self) -> Result<(), RigError> {
        self.cache(CacheKind::Memcached).map(CacheServer::stop)
    }

    /// Starts memcached again, empty, on the same port.
    pub async fn start_memcached(&self) -> Result<(), RigError> {
        self.cache(CacheKind::Memcached)?.start().await
    }

    /// Kills Redis; it keeps nothing on disk, so it comes back empty.
    pub fn stop_redis(&self) -> Result<(), RigError> {
        self.cache(CacheKind::Redis).map(CacheServer::stop)
    }

    /// Starts Redis again, empty, on the same port.
    pub async fn start_redis(&self) -> Result<(), RigError> {
        self.cache(CacheKind::Redis)?.start().await
    }

    fn cache(&self, kind: CacheKind) -> Result<&CacheServer, RigError> {
        let server = match kind {
            CacheKind::Memcached => &self.memcached,
            CacheKind::Redis => &self.redis,
        };
        server.as_ref().ok_or(RigError::Unsupported(match kind {
            CacheKind::Memcached => "this topology has no memcached (TopologyOptions::memcached)",
            CacheKind::Redis => "this topology has no Redis (TopologyOptions::redis)",
        }))
    }

    /// Stops every server and removes the directory, reporting the first failure.
    pub async fn shutdown(mut self) -> Result<(), RigError> {
        self.owned = false;
        let mut first_error = None;
        for node in self.cluster.nodes() {
            if self.cluster.postmaster_pid(node).is_some()
                && let Err(e) = self.cluster.stop(node).await
            {
                first_error.get_or_insert(e);
            }
        }
        // Whatever pg_ctl could not stop is killed.
        self.cluster.stop_all_blocking();
        self.stop_caches();
        if let Err(e) = fs::remove_dir_all(self.dir()) {
            first_error.get_or_insert(RigError::io("removing", self.dir(), e));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Lets every server outlive this handle (for `cargo xtask topology up`); returns the rig
    /// directory. Stop them later with [`EnvRig::teardown`].
    pub fn detach(mut self) -> PathBuf {
        self.owned = false;
        for server in [&self.memcached, &self.redis].into_iter().flatten() {
            server.detach();
        }
        self.cluster.dir.clone()
    }

    fn stop_caches(&self) {
        for server in [&self.memcached, &self.redis].into_iter().flatten() {
            server.stop();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.cluster.stop_all_blocking();
        self.stop_caches();
        if let Err(e) = fs::remove_dir_all(self.dir()) {
            eprintln!(
                "distributed-testkit: could not remove {}: {e}",
                self.dir().display()
            );
        }
    }
}
