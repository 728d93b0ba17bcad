//! The rig as tests see it: servers described by environment variables, and helpers that skip a
//! test when there are none (or fail it, under the xtask).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    RigError, Topology, TopologyOptions,
    cache_server::{self, CacheKind},
    postgres::{Node, PgCluster, postgres_bin_dir},
    process::RunAs,
    url,
};

/// URL of the leader: `postgres://postgres@127.0.0.1:PORT/postgres`.
pub const LEADER_URL: &str = "DISTRIBUTED_LEADER_URL";
/// Comma-separated URLs of the followers, follower 0 first.
pub const FOLLOWER_URLS: &str = "DISTRIBUTED_FOLLOWER_URLS";
/// `127.0.0.1:PORT` of memcached.
pub const MEMCACHED_ADDR: &str = "DISTRIBUTED_MEMCACHED_ADDR";
/// `redis://127.0.0.1:PORT` of Redis.
pub const REDIS_URL: &str = "DISTRIBUTED_REDIS_URL";
/// The rig directory (layout at the crate root).
pub const RIG_DIR: &str = "DISTRIBUTED_RIG_DIR";
/// The followers' apply delay in milliseconds (the largest one, if they differ).
pub const APPLY_DELAY_MS: &str = "DISTRIBUTED_APPLY_DELAY_MS";
/// The directory of the PostgreSQL tools the rig was started with.
pub const PG_BIN_DIR: &str = "DISTRIBUTED_PG_BIN_DIR";
/// Set to `1` by `cargo xtask integration-test`: a test that would skip for want of a rig fails.
pub const REQUIRE_RIG: &str = "DISTRIBUTED_REQUIRE_RIG";

/// The apply delay assumed when [`APPLY_DELAY_MS`] is unset: the xtask's default.
const DEFAULT_APPLY_DELAY: Duration = Duration::from_millis(1000);

/// A topology started by someone else (`cargo xtask integration-test` or `topology up`),
/// described by the environment variables of this module.
///
/// Other tests use the same servers at the same time: only tests that leave them as they found
/// them belong here. The fault controls exist for a topology a developer started by hand with
/// `cargo xtask topology up`; tests that stop servers start a [`Topology`] of their own with
/// [`private_topology_or_skip`].
#[derive(Debug, Clone)]
pub struct EnvRig {
    leader_url: String,
    follower_urls: Vec<String>,
    memcached_addr: Option<String>,
    redis_url: Option<String>,
    apply_delay: Duration,
    dir: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
}

/// Which servers of a rig answer, from [`EnvRig::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RigHealth {
    /// The leader answers and is not in recovery.
    pub leader: bool,
    /// Each follower answers and is in recovery, follower 0 first.
    pub followers: Vec<bool>,
    /// memcached answers `version`; `None` when the rig has none.
    pub memcached: Option<bool>,
    /// Redis answers `PING`; `None` when the rig has none.
    pub redis: Option<bool>,
}

impl RigHealth {
    /// Whether every server the rig has answers.
    pub fn all_up(&self) -> bool {
        self.leader
            && self.followers.iter().all(|&up| up)
            && self.memcached != Some(false)
            && self.redis != Some(false)
    }
}

impl EnvRig {
    /// The rig described by this process's environment; `None` when [`LEADER_URL`] is unset.
    pub fn from_env() -> Result<Option<Self>, RigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The rig described by `lookup` (e.g. the lines of the xtask's state file); `None` when it
    /// has no [`LEADER_URL`].
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, RigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let Some(leader_url) = get(LEADER_URL) else {
            return Ok(None);
        };
        let bad = |var: &'static str, reason: String| RigError::Env { var, reason };
        url::port_of(&leader_url).map_err(|e| bad(LEADER_URL, e.to_string()))?;
        // Present but empty is a topology without followers.
        let follower_urls: Vec<String> = lookup(FOLLOWER_URLS)
            .ok_or_else(|| bad(FOLLOWER_URLS, format!("unset while {LEADER_URL} is set")))?
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        for follower in &follower_urls {
            url::port_of(follower).map_err(|e| bad(FOLLOWER_URLS, e.to_string()))?;
        }
        let memcached_addr = get(MEMCACHED_ADDR);
        if let Some(addr) = &memcached_addr {
            addr.parse::<SocketAddr>()
                .map_err(|e| bad(MEMCACHED_ADDR, format!("{addr:?}: {e}")))?;
        }
        let redis_url = get(REDIS_URL);
        if let Some(redis) = &redis_url {
            url::port_of(redis).map_err(|e| bad(REDIS_URL, e.to_string()))?;
        }
        let apply_delay = match get(APPLY_DELAY_MS) {
            None => DEFAULT_APPLY_DELAY,
            Some(ms) => Duration::from_millis(
                ms.parse()
                    .map_err(|e| bad(APPLY_DELAY_MS, format!("{ms:?}: {e}")))?,
            ),
        };
        Ok(Some(Self {
            leader_url,
            follower_urls,
            memcached_addr,
            redis_url,
            apply_delay,
            dir: get(RIG_DIR).map(PathBuf::from),
            bin_dir: get(PG_BIN_DIR).map(PathBuf::from),
        }))
    }

    /// URL of the leader.
    pub fn leader_url(&self) -> &str {
        &self.leader_url
    }

    /// URLs of the followers, follower 0 first.
    pub fn follower_urls(&self) -> &[String] {
        &self.follower_urls
    }

    /// `127.0.0.1:PORT` of memcached, when the rig has one.
    pub fn memcached_addr(&self) -> Option<&str> {
        self.memcached_addr.as_deref()
    }

    /// `redis://127.0.0.1:PORT` of Redis, when the rig has one.
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref()
    }

    /// How far the followers lag behind the leader (the largest delay if they differ).
    pub fn apply_delay(&self) -> Duration {
        self.apply_delay
    }

    /// The rig directory, when [`RIG_DIR`] is set.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn bin_dir(&self) -> Result<PathBuf, RigError> {
        self.bin_dir.clone().map_or_else(postgres_bin_dir, Ok)
    }

    fn ports(&self) -> Result<(u16, Vec<u16>), RigError> {
        let followers = self
            .follower_urls
            .iter()
            .map(|follower| url::port_of(follower))
            .collect::<Result<_, _>>()?;
        Ok((url::port_of(&self.leader_url)?, followers))
    }

    fn cluster(&self) -> Result<PgCluster, RigError> {
        let dir = self.dir.clone().ok_or(RigError::Unsupported(
            "controlling the servers needs DISTRIBUTED_RIG_DIR",
        ))?;
        let (leader_port, follower_ports) = self.ports()?;
        Ok(PgCluster {
            bin: self.bin_dir()?,
            dir,
            run_as: RunAs::detect()?,
            leader_port,
            follower_ports,
        })
    }

    /// Crashes follower `index` (`pg_ctl stop -m immediate`). Not for the shared xtask rig.
    pub async fn stop_follower(&self, index: usize) -> Result<(), RigError> {
        self.cluster()?.stop_follower(index).await
    }

    /// Starts follower `index` again and waits until it streams.
    pub async fn start_follower(&self, index: usize) -> Result<(), RigError> {
        self.cluster()?.start_follower(index).await
    }

    /// Crashes the leader (`pg_ctl stop -m immediate`). Not for the shared xtask rig.
    pub async fn stop_leader(&self) -> Result<(), RigError> {
        self.cluster()?.stop(Node::Leader).await
    }

    /// Starts the leader again and waits until every running follower streams from it again.
    pub async fn start_leader(&self) -> Result<(), RigError> {
        self.cluster()?.start_leader().await
    }

    /// Freezes what follower `index` shows (`pg_wal_replay_pause()`). Not for the shared xtask rig.
    pub async fn pause_follower_replay(&self, index: usize) -> Result<(), RigError> {
        self.cluster()?.set_replay_paused(index, true).await
    }

    /// Lets follower `index` catch up again (`pg_wal_replay_resume()`).
    pub async fn resume_follower_replay(&self, index: usize) -> Result<(), RigError> {
        self.cluster()?.set_replay_paused(index, false).await
    }

    /// Asks every server whether it is up.
    pub async fn health(&self) -> Result<RigHealth, RigError> {
        let (leader_port, follower_ports) = self.ports()?;
        let bin = self.bin_dir()?;
        let in_recovery = async |port| {
            crate::postgres::psql(&bin, port, "select pg_is_in_recovery()")
                .await
                .ok()
        };
        let leader = in_recovery(leader_port).await.as_deref() == Some("f");
        let mut followers = Vec::with_capacity(follower_ports.len());
        for port in follower_ports {
            followers.push(in_recovery(port).await.as_deref() == Some("t"));
        }
        let memcached = match &self.memcached_addr {
            Some(addr) => Some(cache_server::answers(CacheKind::Memcached, addr).await),
            None => None,
        };
        let redis = match &self.redis_url {
            Some(redis) => {
                let addr = format!("127.0.0.1:{}", url::port_of(redis)?);
                Some(cache_server::answers(CacheKind::Redis, &addr).await)
            }
            None => None,
        };
        Ok(RigHealth {
            leader,
            followers,
            memcached,
            redis,
        })
    }

    /// Stops every server of a detached topology (see [`Topology::detach`]) and removes its
    /// directory.
    pub async fn teardown(self) -> Result<(), RigError> {
        let cluster = self.cluster()?;
        let mut first_error = None;
        for node in cluster.nodes() {
            if cluster.postmaster_pid(node).is_some()
                && let Err(e) = cluster.stop(node).await
            {
                first_error.get_or_insert(e);
            }
        }
        cluster.stop_all_blocking();
        cache_server::stop_from_pid_file(&cluster.dir, CacheKind::Memcached);
        cache_server::stop_from_pid_file(&cluster.dir, CacheKind::Redis);
        if let Err(e) = std::fs::remove_dir_all(&cluster.dir) {
            first_error.get_or_insert(RigError::io("removing", &cluster.dir, e));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Whether [`REQUIRE_RIG`] asks for failures instead of skips.
pub fn rig_required() -> bool {
    std::env::var(REQUIRE_RIG).is_ok_and(|value| !matches!(value.as_str(), "" | "0" | "false"))
}

fn skip<T>(test_name: &str, unset: &str) -> Option<T> {
    if rig_required() {
        panic!(
            "{test_name}: {unset} unset, but {REQUIRE_RIG} is set: the rig that \
             `cargo xtask integration-test` starts did not reach this test"
        );
    }
    eprintln!("{test_name}: skipped: set by cargo xtask integration-test ({unset} unset)");
    None
}

/// The shared PostgreSQL rig, or `None` (after one line saying so) when there is none.
///
/// # Panics
///
/// When there is no rig but [`REQUIRE_RIG`] is set, and when the variables are malformed: a test
/// meant to run against real servers must not pass by skipping.
pub fn rig_or_skip(test_name: &str) -> Option<EnvRig> {
    match EnvRig::from_env() {
        Ok(Some(rig)) => Some(rig),
        Ok(None) => skip(test_name, LEADER_URL),
        Err(e) => panic!("{test_name}: {e}"),
    }
}

/// The shared memcached's `127.0.0.1:PORT`, or `None` (after one line saying so).
///
/// # Panics
///
/// When it is unset but [`REQUIRE_RIG`] is set.
pub fn memcached_or_skip(test_name: &str) -> Option<String> {
    std::env::var(MEMCACHED_ADDR)
        .ok()
        .filter(|addr| !addr.is_empty())
        .or_else(|| skip(test_name, MEMCACHED_ADDR))
}

/// The shared Redis's `redis://127.0.0.1:PORT`, or `None` (after one line saying so).
///
/// # Panics
///
/// When it is unset but [`REQUIRE_RIG`] is set.
pub fn redis_or_skip(test_name: &str) -> Option<String> {
    std::env::var(REDIS_URL)
        .ok()
        .filter(|url| !url.is_empty())
        .or_else(|| skip(test_name, REDIS_URL))
}

/// A [`Topology`] of the test's own, for tests that stop, pause or slow servers; `Ok(None)`
/// (after one line saying so) outside the xtask.
///
/// Private topologies start only when [`RIG_DIR`] or [`REQUIRE_RIG`] is set, so a plain
/// `cargo test --workspace` stays fast and needs no PostgreSQL. Under the xtask they are created
/// inside `$DISTRIBUTED_RIG_DIR/private/` (unless `opts.parent_dir` says otherwise), where the
/// xtask's teardown finds whatever a killed test left behind.
pub async fn private_topology_or_skip(
    test_name: &str,
    mut opts: TopologyOptions,
) -> Result<Option<Topology>, RigError> {
    let rig_dir = std::env::var_os(RIG_DIR).filter(|dir| !dir.is_empty());
    if rig_dir.is_none() && !rig_required() {
        eprintln!(
            "{test_name}: skipped: private topologies start under cargo xtask integration-test ({RIG_DIR} unset)"
        );
        return Ok(None);
    }
    if opts.parent_dir.is_none() {
        opts.parent_dir = rig_dir.map(|dir| PathBuf::from(dir).join("private"));
    }
    Topology::start(opts).await.map(Some)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn rig_from(vars: &[(&str, &str)]) -> Result<Option<EnvRig>, RigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EnvRig::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn no_leader_means_no_rig() -> Result<(), RigError> {
        assert!(rig_from(&[])?.is_none());
        assert!(rig_from(&[(LEADER_URL, ""), (MEMCACHED_ADDR, "127.0.0.1:1")])?.is_none());
        Ok(())
    }

    #[test]
    fn reads_a_full_description() -> Result<(), RigError> {
        let rig = rig_from(&[
            (LEADER_URL, "postgres://postgres@127.0.0.1:5000/postgres"),
            (
                FOLLOWER_URLS,
                "postgres://postgres@127.0.0.1:5001/postgres, postgres://postgres@127.0.0.1:5002/postgres",
            ),
            (MEMCACHED_ADDR, "127.0.0.1:5003"),
            (REDIS_URL, "redis://127.0.0.1:5004"),
            (APPLY_DELAY_MS, "250"),
            (RIG_DIR, "/tmp/distributed-rig-x"),
        ])?
        .ok_or(RigError::Unsupported("expected a rig"))?;
        assert_eq!(rig.follower_urls().len(), 2);
        assert_eq!(
            rig.follower_urls()[1],
            "postgres://postgres@127.0.0.1:5002/postgres"
        );
        assert_eq!(rig.apply_delay(), Duration::from_millis(250));
        assert_eq!(rig.memcached_addr(), Some("127.0.0.1:5003"));
        assert_eq!(rig.redis_url(), Some("redis://127.0.0.1:5004"));
        assert_eq!(rig.dir(), Some(Path::new("/tmp/distributed-rig-x")));
        assert_eq!(rig.ports()?, (5000, vec![5001, 5002]));
        Ok(())
    }

    #[test]
    fn defaults_the_apply_delay() -> Result<(), RigError> {
        let rig = rig_from(&[
            (LEADER_URL, "postgres://postgres@127.0.0.1:5000/postgres"),
            (FOLLOWER_URLS, ""),
        ])?;
        assert_eq!(rig.map(|rig| rig.apply_delay()), Some(DEFAULT_APPLY_DELAY));
        Ok(())
    }

    #[test]
    fn rejects_malformed_variables() {
        let leader = (LEADER_URL, "postgres://postgres@127.0.0.1:5000/postgres");
        let followers = (FOLLOWER_URLS, "postgres://postgres@127.0.0.1:5001/postgres");
        let broken: [&[(&str, &str)]; 5] = [
            &[leader],
            &[(LEADER_URL, "127.0.0.1:5000"), followers],
            &[leader, followers, (APPLY_DELAY_MS, "1s")],
            &[
                leader,
                followers,
                (MEMCACHED_ADDR, "memcache://127.0.0.1:1"),
            ],
            &[leader, followers, (REDIS_URL, "redis://127.0.0.1")],
        ];
        for vars in broken {
            assert!(
                matches!(rig_from(vars), Err(RigError::Env { .. })),
                "{vars:?}"
            );
        }
    }

    #[test]
    fn all_up_needs_every_server_it_has() {
        let health = RigHealth {
            leader: true,
            followers: vec![true, false],
            memcached: None,
            redis: Some(true),
        };
        assert!(!health.all_up());
    }
}
