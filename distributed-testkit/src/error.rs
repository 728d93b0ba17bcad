//! The one error type of the rig.

use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

/// Everything that can go wrong while starting, driving or stopping the rig.
///
/// Failed starts carry the tail of the server's log or of the command's output, so a red test says
/// why the server would not come up without anyone having to find the temp directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RigError {
    /// A program the rig needs is not installed.
    #[error("{program} not found (looked in {searched}); {hint}")]
    MissingProgram {
        /// The program, e.g. `initdb`.
        program: String,
        /// Where the rig looked.
        searched: String,
        /// What to install.
        hint: &'static str,
    },

    /// A program could not be started at all.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// A program ran and failed.
    #[error("{command} failed ({status}):\n{output_tail}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// The last lines of its output, and of the server log when there is one.
        output_tail: String,
    },

    /// A server did not become ready in time.
    #[error("{what} not ready after {waited:?}:\n{log_tail}")]
    NotReady {
        /// The server and the condition waited for.
        what: String,
        /// How long the rig waited.
        waited: Duration,
        /// The last lines of the server's log.
        log_tail: String,
    },

    /// A file system operation failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What the rig was doing.
        action: &'static str,
        /// The path it was doing it to.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    /// A socket operation failed (free port, proxy listener).
    #[error("{action}")]
    Net {
        /// What the rig was doing.
        action: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    /// An environment variable describing the rig is malformed.
    #[error("environment variable {var} is malformed: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A URL could not be parsed.
    #[error("cannot parse {url:?} as scheme://[user@]host:port[/path]")]
    BadUrl {
        /// The URL.
        url: String,
    },

    /// A follower index beyond the topology.
    #[error("no follower {index}: the topology has {count}")]
    NoSuchFollower {
        /// The index asked for.
        index: usize,
        /// How many followers there are.
        count: usize,
    },

    /// The operation needs a server or a piece of state this rig does not have.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl RigError {
    /// Whether a server failed because its port was taken between our check and its bind.
    pub(crate) fn is_port_clash(&self) -> bool {
        let text = match self {
            Self::CommandFailed { output_tail, .. } => output_tail,
            Self::NotReady { log_tail, .. } => log_tail,
            _ => return false,
        };
        text.contains("Address already in use")
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_taken_port_is_recognised_in_the_log_tail() {
        let failed_start = RigError::CommandFailed {
            command: "pg_ctl start".to_owned(),
            status: ExitStatus::from_raw(1 << 8),
            output_tail: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
                .to_owned(),
        };
        assert!(failed_start.is_port_clash());
        assert!(failed_start.to_string().contains("Address already in use"));
        let not_ready = RigError::NotReady {
            what: "redis".to_owned(),
            waited: Duration::from_secs(1),
            log_tail: "Warning: Could not create server TCP listening socket 127.0.0.1:6379: \
                       bind: Address already in use"
                .to_owned(),
        };
        assert!(not_ready.is_port_clash());
        assert!(!RigError::Unsupported("x").is_port_clash());
    }
}
