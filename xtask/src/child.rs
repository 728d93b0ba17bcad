//! Child processes of a task: run with our stdout and stderr, passed SIGINT/SIGTERM, never
//! left behind.

use std::{ffi::OsString, process::Stdio, time::Duration};

use anyhow::Context;
use tokio::{
    process::{Child, Command},
    signal::unix::{Signal, SignalKind, signal},
};

/// How long a child gets to stop by itself after we pass on a signal.
const GRACE: Duration = Duration::from_secs(10);

/// SIGINT and SIGTERM, listened to from the start so neither kills us before teardown.
pub(crate) struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
}

impl Interrupts {
    pub(crate) fn listen() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The signal's conventional exit code (128 + number) once one arrives.
    pub(crate) async fn recv(&mut self) -> u8 {
        tokio::select! {
            _ = self.interrupt.recv() => 130,
            _ = self.terminate.recv() => 143,
        }
    }
}

/// `cargo ARGS...` in the workspace root, with `vars` in its environment.
pub(crate) fn cargo(args: &[&str], vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(crate::cargo());
    cmd.args(args)
        .current_dir(crate::workspace_root())
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `cmd` with our stdout and stderr; on SIGINT or SIGTERM passes the signal on, waits a
/// little, then kills it.
pub(crate) async fn run_child(mut cmd: Command, interrupts: &mut Interrupts) -> anyhow::Result<u8> {
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
