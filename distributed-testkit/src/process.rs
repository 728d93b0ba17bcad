//! Running the servers' command-line tools, as the `postgres` user when we are root.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::RigError;

/// How many log lines a failure message quotes.
const TAIL_LINES: usize = 20;

/// Who the PostgreSQL tools run as: initdb, pg_ctl and postgres refuse to run as root.
#[derive(Debug, Clone)]
pub(crate) enum RunAs {
    CurrentUser,
    /// We are root: switch to this unprivileged account with `runuser`.
    Account {
        name: String,
        uid: u32,
        gid: u32,
    },
}

impl RunAs {
    pub(crate) fn detect() -> Result<Self, RigError> {
        if !rustix::process::geteuid().is_root() {
            return Ok(Self::CurrentUser);
        }
        let (uid, gid) = account_ids("postgres").ok_or(RigError::Unsupported(
            "running as root needs a `postgres` account to run the PostgreSQL tools as",
        ))?;
        Ok(Self::Account {
            name: "postgres".to_owned(),
            uid,
            gid,
        })
    }

    /// A command running `program` as this user.
    pub(crate) fn command(&self, program: &Path) -> Command {
        match self {
            Self::CurrentUser => Command::new(program),
            Self::Account { name, .. } => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", name, "--"]).arg(program);
                cmd
            }
        }
    }

    /// Hands `path` to this user, so the servers can write into it.
    pub(crate) fn chown(&self, path: &Path) -> Result<(), RigError> {
        match self {
            Self::CurrentUser => Ok(()),
            Self::Account { uid, gid, .. } => {
                std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                    .map_err(|e| RigError::io("handing to the postgres user", path, e))
            }
        }
    }
}

/// uid and gid of a local account, from /etc/passwd.
pub(crate) fn account_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// The first `program` found on `PATH`.
pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs a command to completion; a non-zero exit is an error quoting its output and `log`'s tail.
pub(crate) async fn run(cmd: Command, log: Option<&Path>) -> Result<String, RigError> {
    let described = describe(&cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = cmd.output().await.map_err(|source| RigError::Spawn {
        program: described.clone(),
        source,
    })?;
    check(described, output, log)
}

/// [`run`] for `Drop`, which cannot await.
pub(crate) fn run_blocking(mut cmd: Command, log: Option<&Path>) -> Result<String, RigError> {
    let described = describe(&cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RigError::Spawn {
            program: described.clone(),
            source,
        })?;
    check(described, output, log)
}

fn check(command: String, output: Output, log: Option<&Path>) -> Result<String, RigError> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let mut output_tail = last_lines(&format!(
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    ));
    if let Some(log) = log {
        output_tail.push_str(&format!("\n--- {} ---\n{}", log.display(), tail(log)));
    }
    Err(RigError::CommandFailed {
        command,
        status: output.status,
        output_tail,
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last lines of a log file, or a note saying why there are none.
pub(crate) fn tail(path: &Path) -> String {
    match fs::File::open(path) {
        Ok(file) => {
            let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
            last_lines(&lines.join("\n"))
        }
        Err(e) => format!("(no log: {e})"),
    }
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// A loopback port nobody listens on right now.
///
/// The port is free when we look; a server started a moment later normally gets it. Servers are
/// started on it by the caller, so a rare collision shows up as a failed start, not a silent mix-up.
pub(crate) fn free_port() -> Result<u16, RigError> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| RigError::Net {
            action: "finding a free loopback port".to_owned(),
            source,
        })
}

/// Whether `pid` names a live process (a zombie counts as dead).
pub(crate) fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The command line of a live process, arguments joined by spaces.
pub(crate) fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// SIGKILLs `pid`; already gone is fine.
pub(crate) fn kill(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _already_gone = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Polls `ready` every 50 ms until it says yes or `limit` has passed.
pub(crate) async fn poll_until<F, Fut>(limit: Duration, mut ready: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if ready().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        let text: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        let tail = last_lines(&text.join("\n"));
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.ends_with("49"));
        assert!(tail.starts_with("30"));
    }

    #[test]
    fn our_own_process_is_alive_and_has_a_command_line() {
        assert!(is_alive(std::process::id()));
        assert!(cmdline(std::process::id()).is_some_and(|c| !c.is_empty()));
        assert!(!is_alive(u32::MAX));
    }

    #[test]
    fn root_has_an_account_entry() {
        assert_eq!(account_ids("root"), Some((0, 0)));
        assert_eq!(account_ids("no-such-account-here"), None);
    }
}
