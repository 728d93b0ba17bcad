//! `cargo xtask demo [--apply-delay-ms N] [--followers N] [-- DEMO_ARGS...]`: starts a real
//! leader with lagging followers and memcached, runs the demo app and its scripted client
//! against them (`distributed-demo`), and tears everything down.
//!
//! DEMO_ARGS: `--mode time|causal` (default causal), `--seconds N` (20), `--sessions N` (12).

use std::process::ExitCode;

use distributed_testkit::TopologyOptions;

use crate::{
    args::TopologyFlags,
    child::{Interrupts, cargo, run_child},
    prerequisites,
    rig::Rig,
};

/// Runs the task; the exit code is the demo's (non-zero when it saw a stale own write).
pub(crate) fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let flags = TopologyFlags::parse(args)?;
    prerequisites::ensure()?;
    crate::runtime()?.block_on(demo(flags))
}

async fn demo(flags: TopologyFlags) -> anyhow::Result<ExitCode> {
    let mut interrupts = Interrupts::listen()?;
    // Build before the servers start: a build error needs none, and the run is then quick.
    let build = cargo(
        &["build", "--quiet", "--locked", "-p", "distributed-demo"],
        &[],
    );
    let code = run_child(build, &mut interrupts).await?;
    if code != 0 {
        return Ok(ExitCode::from(code));
    }
    let opts = TopologyOptions {
        followers: flags.followers,
        apply_delay: flags.apply_delay,
        memcached: true,
        redis: false,
        ..TopologyOptions::default()
    };
    let rig = match Rig::start(opts, &mut interrupts).await? {
        Ok(rig) => rig,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    let mut args = vec!["run", "--quiet", "--locked", "-p", "distributed-demo", "--"];
    args.extend(flags.passthrough.iter().map(String::as_str));
    let outcome = run_child(cargo(&args, &rig.env_vars()), &mut interrupts).await;
    let teardown = rig.teardown().await;
    let code = outcome?;
    teardown?;
    Ok(ExitCode::from(code))
}
