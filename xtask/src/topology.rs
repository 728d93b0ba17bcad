//! `cargo xtask topology up|status|down`: the rig's servers for working by hand, kept running
//! between commands. Their description lives in a state file that a shell can source.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use distributed_testkit::{EnvRig, Topology, TopologyOptions};

use crate::{args::TopologyFlags, prerequisites, survivors};

/// Marks the line of the state file that records the servers' pids.
const PIDS_LINE: &str = "# pids:";

/// Runs `topology up`, `topology status` or `topology down`.
pub(crate) fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let state = state_file();
    match args.split_first() {
        Some((action, rest)) if action == "up" => {
            let flags = TopologyFlags::parse(rest)?;
            prerequisites::ensure()?;
            crate::runtime()?.block_on(up(&state, flags))
        }
        Some((action, [])) if action == "status" => crate::runtime()?.block_on(status(&state)),
        Some((action, [])) if action == "down" => crate::runtime()?.block_on(down(&state)),
        _ => bail!(
            "usage: cargo xtask topology up [--apply-delay-ms N] [--followers N] | status | down"
        ),
    }
}

/// `target/xtask-topology.env`, or the same name in `$CARGO_TARGET_DIR`.
fn state_file() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    target.join("xtask-topology.env")
}

async fn up(state: &Path, flags: TopologyFlags) -> anyhow::Result<ExitCode> {
    if state.exists() {
        bail!(
            "{} exists: a topology is already up (`cargo xtask topology down` first)",
            state.display()
        );
    }
    let topology = Topology::start(TopologyOptions {
        followers: flags.followers,
        apply_delay: flags.apply_delay,
        memcached: true,
        redis: true,
        ..TopologyOptions::default()
    })
    .await
    .context("starting the topology")?;
    let mut text = String::from(
        "# written by `cargo xtask topology up`; load with: set -a; . THIS_FILE; set +a\n",
    );
    for (name, value) in topology.env_vars() {
        text.push_str(&format!("{name}='{value}'\n"));
    }
    let pids: Vec<String> = topology.pids().iter().map(u32::to_string).collect();
    text.push_str(&format!("{PIDS_LINE} {}\n", pids.join(" ")));
    if let Some(parent) = state.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    // Written before detaching, so a failure here still tears the servers down.
    fs::write(state, &text).with_context(|| format!("writing {}", state.display()))?;
    topology.detach();
    print!("{text}");
    println!("state in {}", state.display());
    Ok(ExitCode::SUCCESS)
}

/// The state file's variables and recorded pids.
fn read_state(state: &Path) -> anyhow::Result<(EnvRig, Vec<u32>)> {
    let text = fs::read_to_string(state).with_context(|| {
        format!(
            "reading {} (is a topology up? `cargo xtask topology up`)",
            state.display()
        )
    })?;
    let mut vars = Vec::new();
    let mut pids = Vec::new();
    for line in text.lines() {
        if let Some(list) = line.strip_prefix(PIDS_LINE) {
            pids = list
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect();
        } else if let Some((name, value)) = line.split_once('=')
            && !line.starts_with('#')
        {
            vars.push((name.to_owned(), value.trim_matches('\'').to_owned()));
        }
    }
    let lookup = |name: &str| {
        vars.iter()
            .find(|(var, _)| var == name)
            .map(|(_, value)| value.clone())
    };
    let rig = EnvRig::from_vars(lookup)?
        .with_context(|| format!("{} describes no topology", state.display()))?;
    Ok((rig, pids))
}

async fn status(state: &Path) -> anyhow::Result<ExitCode> {
    let (rig, _) = read_state(state)?;
    let health = rig.health().await?;
    let word = |up: bool| if up { "up" } else { "DOWN" };
    println!("leader     {}  {}", word(health.leader), rig.leader_url());
    for (url, up) in rig.follower_urls().iter().zip(&health.followers) {
        println!("follower   {}  {url}", word(*up));
    }
    if let (Some(addr), Some(up)) = (rig.memcached_addr(), health.memcached) {
        println!("memcached  {}  {addr}", word(up));
    }
    if let (Some(url), Some(up)) = (rig.redis_url(), health.redis) {
        println!("redis      {}  {url}", word(up));
    }
    if let Some(dir) = rig.dir() {
        println!("directory  {}", dir.display());
    }
    Ok(if health.all_up() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn down(state: &Path) -> anyhow::Result<ExitCode> {
    let (rig, pids) = read_state(state)?;
    let dir = rig
        .dir()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} names no rig directory", state.display()))?;
    let teardown = rig.teardown().await;
    let leftovers = survivors::clean_or_fail(&dir, &pids);
    fs::remove_file(state).with_context(|| format!("removing {}", state.display()))?;
    teardown?;
    leftovers?;
    println!("topology down, {} removed", dir.display());
    Ok(ExitCode::SUCCESS)
}
