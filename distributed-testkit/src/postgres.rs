//! One PostgreSQL leader and its streaming followers, driven through initdb, pg_ctl and psql.
//!
//! Command-line tools rather than a driver: the rig then needs no database client library, and
//! what it does is what an operator would type.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    RigError, env,
    process::{self, RunAs},
};

/// How long a server may take to start, stop or begin streaming.
const PATIENCE: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "install PostgreSQL (Debian: apt-get install postgresql)";

/// The directory holding `initdb`, `pg_ctl`, `pg_basebackup` and `psql`.
///
/// Looks at `$DISTRIBUTED_PG_BIN_DIR`, then `/usr/lib/postgresql/15/bin`, then
/// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn postgres_bin_dir() -> Result<PathBuf, RigError> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "pg_basebackup", "psql"]
            .iter()
            .all(|tool| dir.join(tool).is_file())
    };
    let from_env = std::env::var_os(env::PG_BIN_DIR).map(PathBuf::from);
    let debian_15 = Some(PathBuf::from("/usr/lib/postgresql/15/bin"));
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let newest_debian = newest_debian_bin_dir();
    let on_path = process::find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf));
    [from_env, debian_15, from_pg_config, newest_debian, on_path]
        .into_iter()
        .flatten()
        .find(|dir| has_tools(dir))
        .ok_or(RigError::MissingProgram {
            program: "initdb".to_owned(),
            searched: format!(
                "${}, /usr/lib/postgresql/*/bin, pg_config --bindir, PATH",
                env::PG_BIN_DIR
            ),
            hint: INSTALL_HINT,
        })
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// A server of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Leader,
    Follower(usize),
}

impl Node {
    /// Name of its data directory inside the rig directory, its log (`NAME.log`) and its
    /// `application_name` on the leader.
    pub(crate) fn name(self) -> String {
        match self {
            Self::Leader => "leader".to_owned(),
            Self::Follower(i) => format!("follower-{i}"),
        }
    }
}

/// The PostgreSQL part of a rig directory.
#[derive(Debug, Clone)]
pub(crate) struct PgCluster {
    pub(crate) bin: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) run_as: RunAs,
    pub(crate) leader_port: u16,
    pub(crate) follower_ports: Vec<u16>,
}

impl PgCluster {
    pub(crate) fn url(&self, node: Node) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port(node))
    }

    pub(crate) fn nodes(&self) -> impl Iterator<Item = Node> + use<> {
        std::iter::once(Node::Leader).chain((0..self.follower_ports.len()).map(Node::Follower))
    }

    pub(crate) fn check(&self, node: Node) -> Result<Node, RigError> {
        match node {
            Node::Follower(index) if index >= self.follower_ports.len() => {
                Err(RigError::NoSuchFollower {
                    index,
                    count: self.follower_ports.len(),
                })
            }
            _ => Ok(node),
        }
    }

    fn port(&self, node: Node) -> u16 {
        match node {
            Node::Leader => self.leader_port,
            Node::Follower(i) => self.follower_ports.get(i).copied().unwrap_or_default(),
        }
    }

    fn data_dir(&self, node: Node) -> PathBuf {
        self.dir.join(node.name())
    }

    fn log(&self, node: Node) -> PathBuf {
        self.dir.join(format!("{}.log", node.name()))
    }

    fn tool(&self, tool: &str) -> Command {
        let mut cmd = self.run_as.command(&self.bin.join(tool));
        // The postgres account may not be allowed into our working directory.
        cmd.current_dir(&self.dir);
        cmd
    }

    /// `initdb` and the leader's configuration; the leader is not started.
    pub(crate) async fn init_leader(&self) -> Result<(), RigError> {
        let data = self.data_dir(Node::Leader);
        let mut initdb = self.tool("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["--encoding=UTF8", "--no-locale"]);
        process::run(initdb, None).await?;
        // trust for local and 127.0.0.1 connections, replication included, is initdb's default
        // pg_hba.conf with --auth=trust.
        append_conf(
            &data.join("postgresql.conf"),
            &format!(
                "\n# distributed-testkit\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 unix_socket_directories = '{dir}'\n\
                 wal_level = replica\n\
                 max_wal_senders = 10\n\
                 wal_keep_size = '64MB'\n\
                 hot_standby = on\n\
                 hot_standby_feedback = on\n\
                 wal_retrieve_retry_interval = '500ms'\n\
                 fsync = off\n\
                 shared_buffers = '32MB'\n\
                 max_connections = 100\n\
                 cluster_name = 'leader'\n",
                port = self.leader_port,
                dir = self.dir.display(),
            ),
        )
    }

    /// A follower cloned from the running leader with `pg_basebackup`, configured, not started.
    pub(crate) async fn make_follower(
        &self,
        index: usize,
        apply_delay: Duration,
    ) -> Result<(), RigError> {
        let node = self.check(Node::Follower(index))?;
        let data = self.data_dir(node);
        let mut basebackup = self.tool("pg_basebackup");
        basebackup
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"])
            // -R copies these into primary_conninfo; application_name names the follower in
            // the leader's pg_stat_replication.
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres application_name={}",
                self.leader_port,
                node.name()
            ));
        process::run(basebackup, Some(&self.log(Node::Leader))).await?;
        append_conf(
            &data.join("postgresql.conf"),
            &format!(
                "\n# distributed-testkit follower\n\
                 port = {port}\n\
                 recovery_min_apply_delay = '{delay}ms'\n\
                 cluster_name = '{name}'\n",
                port = self.port(node),
                delay = apply_delay.as_millis(),
                name = node.name(),
            ),
        )
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub(crate) async fn start(&self, node: Node) -> Result<(), RigError> {
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir(node))
            .arg("-l")
            .arg(self.log(node))
            .args(["-w", "-t", &PATIENCE.as_secs().to_string(), "start"]);
        process::run(pg_ctl, Some(&self.log(node))).await?;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: a crash, as far as the server can tell.
    pub(crate) async fn stop(&self, node: Node) -> Result<(), RigError> {
        process::run(self.stop_command(node), Some(&self.log(node))).await?;
        Ok(())
    }

    fn stop_command(&self, node: Node) -> Command {
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir(node))
            .args(["-w", "-t", &PATIENCE.as_secs().to_string()])
            .args(["-m", "immediate", "stop"]);
        pg_ctl
    }

    /// Whether the server's postmaster is running.
    pub(crate) fn postmaster_pid(&self, node: Node) -> Option<u32> {
        // Root can read the postgres-owned pid file; so can the postgres user itself.
        let pid_file = fs::read_to_string(self.data_dir(node).join("postmaster.pid")).ok()?;
        pid_file
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
            .filter(|&pid| process::is_alive(pid))
    }

    /// Stops every running server, for `Drop`: pg_ctl first, SIGKILL if pg_ctl cannot.
    pub(crate) fn stop_all_blocking(&self) {
        for node in self.nodes() {
            let Some(pid) = self.postmaster_pid(node) else {
                continue;
            };
            if process::run_blocking(self.stop_command(node), None).is_err() {
                // Backends exit on their own once their postmaster is gone.
                process::kill(pid);
            }
        }
    }

    pub(crate) async fn sql(&self, node: Node, statement: &str) -> Result<String, RigError> {
        psql(&self.bin, self.port(node), statement).await
    }

    /// Waits until follower `index` is in recovery and the leader streams to it.
    pub(crate) async fn wait_streaming(&self, index: usize) -> Result<(), RigError> {
        let node = self.check(Node::Follower(index))?;
        let streaming_query = format!(
            "select exists(select from pg_stat_replication \
             where application_name = '{}' and state = 'streaming')",
            node.name()
        );
        let ready = process::poll_until(PATIENCE, || async {
            let in_recovery = self.sql(node, "select pg_is_in_recovery()").await;
            let streaming = self.sql(Node::Leader, &streaming_query).await;
            matches!(
                (in_recovery.as_deref(), streaming.as_deref()),
                (Ok("t"), Ok("t"))
            )
        })
        .await;
        if ready {
            return Ok(());
        }
        Err(RigError::NotReady {
            what: format!(
                "{} (in recovery and streaming from the leader)",
                node.name()
            ),
            waited: PATIENCE,
            log_tail: format!(
                "{}\n--- leader ---\n{}",
                process::tail(&self.log(node)),
                process::tail(&self.log(Node::Leader))
            ),
        })
    }

    /// Waits for every follower whose server is running to stream again (after a leader restart).
    pub(crate) async fn wait_running_followers_streaming(&self) -> Result<(), RigError> {
        for index in 0..self.follower_ports.len() {
            if self.postmaster_pid(Node::Follower(index)).is_some() {
                self.wait_streaming(index).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn stop_follower(&self, index: usize) -> Result<(), RigError> {
        self.stop(self.check(Node::Follower(index))?).await
    }

    pub(crate) async fn start_follower(&self, index: usize) -> Result<(), RigError> {
        self.start(self.check(Node::Follower(index))?).await?;
        self.wait_streaming(index).await
    }

    pub(crate) async fn start_leader(&self) -> Result<(), RigError> {
        self.start(Node::Leader).await?;
        self.wait_running_followers_streaming().await
    }

    pub(crate) async fn set_replay_paused(
        &self,
        index: usize,
        paused: bool,
    ) -> Result<(), RigError> {
        let node = self.check(Node::Follower(index))?;
        let statement = if paused {
            "select pg_wal_replay_pause()"
        } else {
            "select pg_wal_replay_resume()"
        };
        self.sql(node, statement).await.map(drop)
    }

    /// Pids of the running postmasters.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.nodes()
            .filter_map(|node| self.postmaster_pid(node))
            .collect()
    }
}

/// Runs one SQL statement with psql on `127.0.0.1:port`; returns its unaligned, tuples-only
/// output.
pub(crate) async fn psql(bin: &Path, port: u16, statement: &str) -> Result<String, RigError> {
    let mut psql = Command::new(bin.join("psql"));
    psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port.to_string()])
        .args(["-c", statement])
        .env("PGCONNECT_TIMEOUT", "5");
    Ok(process::run(psql, None).await?.trim().to_owned())
}

fn append_conf(path: &Path, lines: &str) -> Result<(), RigError> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(lines.as_bytes()))
        .map_err(|e| RigError::io("appending to", path, e))
}
