//! Cache servers of a test's own, to stop and start without disturbing the shared rig.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use distributed_memcache::conformance::ServerControl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which server.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Memcached,
    Redis,
}

/// A memcached or Redis child process on a loopback port it keeps across restarts; killed on
/// drop.
#[derive(Debug)]
pub struct OwnServer {
    kind: Kind,
    program: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
}

impl OwnServer {
    /// Starts one on a free port.
    pub async fn start(kind: Kind) -> Self {
        let program = match kind {
            Kind::Memcached => distributed_testkit::memcached_program(),
            Kind::Redis => distributed_testkit::redis_program(),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let server = Self {
            kind,
            program,
            port,
            child: Mutex::new(None),
        };
        server.spawn().await;
        server
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        let port = self.port.to_string();
        match self.kind {
            Kind::Memcached => {
                cmd.args(["-l", "127.0.0.1", "-p", &port, "-U", "0", "-m", "64"]);
                if is_root() {
                    cmd.args(["-u", "nobody"]);
                }
            }
            Kind::Redis => {
                cmd.args(["--port", &port, "--bind", "127.0.0.1"]).args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    async fn spawn(&self) {
        let child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.program));
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.answers().await {
            assert!(
                Instant::now() < deadline,
                "{:?} did not answer on {}",
                self.kind,
                self.addr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn answers(&self) -> bool {
        let (request, answer): (&[u8], &[u8]) = match self.kind {
            Kind::Memcached => (b"version\r\n", b"VERSION "),
            Kind::Redis => (b"PING\r\n", b"+PONG"),
        };
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr()).await?;
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

    fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn is_root() -> bool {
    // memcached refuses to run as root without -u; /proc/self tells who we are.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[async_trait]
impl ServerControl for OwnServer {
    async fn stop(&self) {
        self.kill();
    }

    async fn start(&self) {
        self.spawn().await;
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether tests that start servers of their own should run: under the rig (the variables the
/// xtask sets), as the shared-server tests do.
pub fn own_servers_or_skip(test: &str, kind: Kind) -> bool {
    match kind {
        Kind::Memcached => distributed_testkit::memcached_or_skip(test).is_some(),
        Kind::Redis => distributed_testkit::redis_or_skip(test).is_some(),
    }
}

/// Timeouts for tests that check behaviour, not speed: tests run in parallel on two cores, and
/// the defaults (tens of milliseconds) would turn a scheduling stall into a failure.
pub const PATIENT: Duration = Duration::from_millis(500);

/// A prefix no other test run uses, for keys on a shared server.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{test}:{}:{nanos}:", std::process::id())
}
