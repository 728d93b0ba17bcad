//! `cargo xtask demo`: an end-to-end demonstration of read-your-writes routing (to be written).

use std::process::ExitCode;

/// Runs the demo.
pub(crate) fn run(_args: &[String]) -> anyhow::Result<ExitCode> {
    eprintln!("xtask demo: not yet implemented");
    Ok(ExitCode::from(2))
}
