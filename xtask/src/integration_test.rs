//! `cargo xtask integration-test`: start the rig, run every test of the workspace against it,
//! tear it down, and prove nothing survived.

use std::{
    ffi::OsString,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use distributed_testkit::{Topology, TopologyOptions, env};
use tokio::{
    process::{Child, Command},
    signal::unix::{Signal, SignalKind, signal},
};

use crate::{args::TopologyFlags, prerequisites, survivors};

/// How long the test runner gets to stop by itself after we pass on a signal.
const GRACE: Duration = Duration::from_secs(10);

/// Runs the task; the exit code is the tests' (or a failure of teardown).
pub(crate) fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let flags = TopologyFlags::parse(args)?;
    prerequisites::ensure()?;
    crate::runtime()?.block_on(run_with_rig(flags))
}

/// SIGINT and SIGTERM, listened to from the start so neither kills us before teardown.
struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
}

impl Interrupts {
    fn listen() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The signal's conventional exit code (128 + number) once one arrives.
    async fn recv(&mut self) -> u8 {
        tokio::select! {
            _ = self.interrupt.recv() => 130,
            _ = self.terminate.recv() => 143,
        }
    }
}

async fn run_with_rig(flags: TopologyFlags) -> anyhow::Result<ExitCode> {
    let mut interrupts = Interrupts::listen()?;
    let runner = TestRunner::detect().await;
    // Compile first: a build error needs no servers, and rustc would compete with the
    // timing-sensitive tests for the CPU.
    let build_code = run_child(runner.build(), &mut interrupts).await?;
    if build_code != 0 {
        return Ok(ExitCode::from(build_code));
    }
    let opts = TopologyOptions {
        followers: flags.followers,
        apply_delay: flags.apply_delay,
        memcached: true,
        redis: true,
        ..TopologyOptions::default()
    };
    let started = Instant::now();
    // Dropping the half-started topology on a signal stops what it had started.
    let topology = tokio::select! {
        topology = Topology::start(opts) => topology.context("starting the rig")?,
        code = interrupts.recv() => return Ok(ExitCode::from(code)),
    };
    eprintln!(
        "xtask: rig up in {:.1}s in {}: leader {}, followers {}, memcached {}, redis {}",
        started.elapsed().as_secs_f64(),
        topology.dir().display(),
        topology.leader_url(),
        topology.follower_urls().join(" "),
        topology.memcached_addr().unwrap_or("-"),
        topology.redis_url().unwrap_or("-"),
    );
    let mut pids = topology.pids();
    let dir = topology.dir().to_path_buf();

    let mut vars: Vec<(&str, String)> = topology.env_vars();
    vars.push((env::REQUIRE_RIG, "1".to_owned()));
    let outcome = run_tests(&runner, &vars, &flags.passthrough, &mut interrupts).await;

    pids.extend(topology.pids());
    let teardown = topology.shutdown().await;
    let leftovers = survivors::clean_or_fail(&dir, &pids);
    let code = outcome?;
    teardown.context("tearing the rig down")?;
    leftovers?;
    eprintln!("xtask: rig torn down, nothing left running");
    Ok(ExitCode::from(code))
}

/// nextest when it is installed, `cargo test` otherwise.
enum TestRunner {
    Nextest,
    CargoTest,
}

/// What every cargo invocation of the run shares.
const COMMON: [&str; 3] = ["--workspace", "--all-features", "--locked"];

impl TestRunner {
    async fn detect() -> Self {
        let nextest = Command::new(crate::cargo())
            .args(["nextest", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success());
        if nextest {
            Self::Nextest
        } else {
            eprintln!("xtask: cargo-nextest not installed, using cargo test");
            Self::CargoTest
        }
    }

    fn subcommand(&self) -> &'static [&'static str] {
        match self {
            Self::Nextest => &["nextest", "run"],
            Self::CargoTest => &["test"],
        }
    }

    fn build(&self) -> Command {
        let mut cmd = cargo(self.subcommand(), &[]);
        cmd.arg("--no-run");
        cmd
    }
}

/// The tests, then the doc tests nextest cannot run; the first failing exit code wins.
async fn run_tests(
    runner: &TestRunner,
    vars: &[(&str, String)],
    passthrough: &[String],
    interrupts: &mut Interrupts,
) -> anyhow::Result<u8> {
    let mut tests = cargo(runner.subcommand(), vars);
    tests.args(passthrough);
    let tests_code = run_child(tests, interrupts).await?;
    if tests_code >= 128 {
        return Ok(tests_code);
    }
    let doc_code = run_child(cargo(&["test", "--doc"], vars), interrupts).await?;
    Ok(if tests_code != 0 {
        tests_code
    } else {
        doc_code
    })
}

fn cargo(subcommand: &[&str], vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(crate::cargo());
    cmd.args(subcommand)
        .args(COMMON)
        .current_dir(crate::workspace_root())
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `cmd` with our stdout and stderr; on SIGINT or SIGTERM passes the signal on, waits a
/// little, then kills it.
async fn run_child(mut cmd: Command, interrupts: &mut Interrupts) -> anyhow::Result<u8> {
    let described: Vec<OsString> = std::iter::once(cmd.as_std().get_program())
        .chain(cmd.as_std().get_args())
        .map(ToOwned::to_owned)
        .collect();
    eprintln!("xtask: running {}", shown(&described));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", shown(&described)))?;
    tokio::select! {
        status = child.wait() => {
            let status = status.with_context(|| format!("waiting for {}", shown(&described)))?;
            Ok(exit_code(status))
        }
        code = interrupts.recv() => {
            eprintln!("xtask: interrupted, stopping the tests");
            stop(&mut child, code).await;
            Ok(code)
        }
    }
}

async fn stop(child: &mut Child, signal_code: u8) {
    let signal = if signal_code == 130 {
        rustix::process::Signal::INT
    } else {
        rustix::process::Signal::TERM
    };
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _already_gone = rustix::process::kill_process(pid, signal);
    }
    if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
        let _already_gone = child.kill().await;
    }
}

/// The status as a shell reports it: the exit code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    u8::try_from(code).unwrap_or(1)
}

fn shown(parts: &[OsString]) -> String {
    parts
        .iter()
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
