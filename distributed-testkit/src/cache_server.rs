//! memcached and Redis as child processes on a fixed loopback port, restartable on that port.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{RigError, process};

/// How long a cache server may take to answer its first ping.
const PATIENCE: Duration = Duration::from_secs(15);

/// The cache servers the rig can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// memcached.
    Memcached,
    /// Redis.
    Redis,
}

impl CacheKind {
    fn name(self) -> &'static str {
        match self {
            Self::Memcached => "memcached",
            Self::Redis => "redis",
        }
    }

    /// A request and the start of the answer that proves the server is serving.
    fn ping(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Self::Memcached => (b"version\r\n", b"VERSION "),
            Self::Redis => (b"PING\r\n", b"+PONG"),
        }
    }
}

/// The memcached binary.
pub fn memcached_program() -> Result<PathBuf, RigError> {
    program(
        "memcached",
        "install memcached (Debian: apt-get install memcached)",
    )
}

/// The redis-server binary.
pub fn redis_program() -> Result<PathBuf, RigError> {
    program(
        "redis-server",
        "install Redis (Debian: apt-get install redis-server)",
    )
}

fn program(name: &str, hint: &'static str) -> Result<PathBuf, RigError> {
    process::find_on_path(name).ok_or(RigError::MissingProgram {
        program: name.to_owned(),
        searched: "PATH".to_owned(),
        hint,
    })
}

/// Whether a memcached or Redis server answers its protocol's ping at `addr` within a second.
pub(crate) async fn answers(kind: CacheKind, addr: &str) -> bool {
    let (request, answer) = kind.ping();
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut reply = vec![0; answer.len()];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply == answer)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), exchange).await,
        Ok(Ok(true))
    )
}

/// One cache server of a topology.
#[derive(Debug)]
pub(crate) struct CacheServer {
    kind: CacheKind,
    program: PathBuf,
    port: u16,
    addr: String,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl CacheServer {
    /// Picks the program and a free port; does not start anything.
    pub(crate) fn new(kind: CacheKind, dir: &Path) -> Result<Self, RigError> {
        let program = match kind {
            CacheKind::Memcached => memcached_program()?,
            CacheKind::Redis => redis_program()?,
        };
        let port = process::free_port()?;
        Ok(Self {
            kind,
            program,
            port,
            addr: format!("127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            child: Mutex::new(None),
        })
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.kind.name()))
    }

    /// Where the pid is written, so a process that did not start the server can stop it.
    pub(crate) fn pid_file(dir: &Path, kind: CacheKind) -> PathBuf {
        dir.join(format!("{}.pid", kind.name()))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        let port = self.port.to_string();
        match self.kind {
            CacheKind::Memcached => {
                cmd.args(["-l", "127.0.0.1", "-p", &port, "-U", "0", "-m", "64"]);
                if rustix::process::geteuid().is_root() {
                    // memcached refuses to run as root without an account to switch to.
                    let account = if process::account_ids("memcache").is_some() {
                        "memcache"
                    } else {
                        "nobody"
                    };
                    cmd.args(["-u", account]);
                }
            }
            CacheKind::Redis => {
                cmd.args(["--port", &port, "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                    // Keeps the command line (and the rig directory in it) visible to pgrep.
                    .args(["--set-proc-title", "no"])
                    .arg("--dir")
                    .arg(&self.dir);
            }
        }
        cmd
    }

    /// Starts the server and waits until it answers a ping.
    pub(crate) async fn start(&self) -> Result<(), RigError> {
        let log_path = self.log();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RigError::io("opening", &log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| RigError::io("opening", &log_path, e))?;
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd.spawn().map_err(|source| RigError::Spawn {
            program: self.program.display().to_string(),
            source,
        })?;
        let pid = child.id();
        let pid_file = Self::pid_file(&self.dir, self.kind);
        *self.lock() = Some(child);
        fs::write(&pid_file, format!("{pid}\n"))
            .map_err(|e| RigError::io("writing", &pid_file, e))?;

        let addr = self.addr();
        let ready = process::poll_until(PATIENCE, || async {
            process::is_alive(pid) && answers(self.kind, addr).await
        })
        .await;
        if ready {
            return Ok(());
        }
        self.stop();
        Err(RigError::NotReady {
            what: format!("{} on {addr}", self.kind.name()),
            waited: PATIENCE,
            log_tail: process::tail(&log_path),
        })
    }

    /// Kills the server (SIGKILL: it keeps nothing worth a clean shutdown) and reaps it.
    pub(crate) fn stop(&self) {
        if let Some(mut child) = self.lock().take() {
            let _already_exited = child.kill();
            let _status = child.wait();
        }
        let _never_written = fs::remove_file(Self::pid_file(&self.dir, self.kind));
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// Lets the server outlive this handle.
    pub(crate) fn detach(&self) {
        // Dropping a std Child neither kills nor waits.
        drop(self.lock().take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves a valid Option behind.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stops a server started by another process, from its pid file in `dir`.
pub(crate) fn stop_from_pid_file(dir: &Path, kind: CacheKind) {
    let pid_file = CacheServer::pid_file(dir, kind);
    let pid = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok());
    if let Some(pid) = pid {
        // A recycled pid would belong to some other program: only kill what is still ours.
        let program = match kind {
            CacheKind::Memcached => "memcached",
            CacheKind::Redis => "redis-server",
        };
        if process::cmdline(pid).is_some_and(|cmd| cmd.contains(program)) {
            process::kill(pid);
        }
    }
    let _never_written = fs::remove_file(pid_file);
}

/// A memcached or Redis of a test's own, for tests that stop and restart it without
/// disturbing the servers other tests share: on a free loopback port that it keeps across
/// restarts, its log in a temporary directory, stopped and removed on drop.
#[derive(Debug)]
pub struct StandaloneCache {
    server: CacheServer,
    _dir: tempfile::TempDir,
}

impl StandaloneCache {
    /// Starts one and waits until it answers.
    ///
    /// # Errors
    /// When the program is missing or the server does not start.
    pub async fn start(kind: CacheKind) -> Result<Self, RigError> {
        let dir = tempfile::Builder::new()
            .prefix("distributed-cache-")
            .tempdir()
            .map_err(|e| RigError::io("creating", Path::new("/tmp"), e))?;
        let server = CacheServer::new(kind, dir.path())?;
        server.start().await?;
        Ok(Self { server, _dir: dir })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.server.addr()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.server.addr())
    }

    /// Kills the server.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// Starts it again, on the same port.
    ///
    /// # Errors
    /// When it does not start.
    pub async fn restart(&self) -> Result<(), RigError> {
        self.server.start().await
    }
}

impl Drop for StandaloneCache {
    fn drop(&mut self) {
        self.server.stop();
    }
}
