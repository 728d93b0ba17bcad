//! `cargo xtask`: project automation, one module per task.
//!
//! ```text
//! cargo xtask integration-test [--apply-delay-ms N] [--followers N] [-- NEXTEST_ARGS...]
//! cargo xtask topology up [--apply-delay-ms N] [--followers N]
//! cargo xtask topology status
//! cargo xtask topology down
//! cargo xtask demo [--apply-delay-ms N] [--followers N] [-- --mode time|causal --seconds N --sessions N]
//! ```

mod args;
mod child;
mod demo;
mod integration_test;
mod prerequisites;
mod rig;
mod survivors;
mod topology;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  integration-test [--apply-delay-ms N] [--followers N] [-- NEXTEST_ARGS...]
      start PostgreSQL (leader + lagging followers), memcached and Redis, run every test
      of the workspace against them, tear everything down
  topology up [--apply-delay-ms N] [--followers N]
      start the same servers and leave them running (state in target/xtask-topology.env)
  topology status | topology down
      show whether they answer | stop them
  demo [--apply-delay-ms N] [--followers N] [-- --mode time|causal --seconds N --sessions N]
      start the same servers, run the demo app and its scripted client against them (the
      routing, live), tear everything down";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => ("help", &[][..]),
    };
    let outcome = match task {
        "integration-test" => integration_test::run(rest),
        "topology" => topology::run(rest),
        "demo" => demo::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown task {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), so nested builds use the same toolchain.
fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A runtime for one task: the rig's tools are processes and sockets, one thread is plenty.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
