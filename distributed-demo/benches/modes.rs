//! Causal against time mode on real servers, in one run: the demo's app and scripted visitors
//! against a real leader and two followers applying its log 200 ms late, a 2 s lag window, the
//! same workload in each mode one after the other. Reports the share of routed reads served by
//! followers and the own writes missed; a naive read of each own write straight from a
//! follower is the control that must miss.
//!
//! `cargo bench -p distributed-demo --bench modes` (starts and stops its own servers).

#![allow(missing_docs)] // a bench binary

use std::time::Duration;

use anyhow::Context;
use distributed_demo::{DemoOptions, Mode, Report};
use distributed_testkit::{Topology, TopologyOptions};

const APPLY_DELAY: Duration = Duration::from_millis(200);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(compare())
}

async fn compare() -> anyhow::Result<()> {
    let topology = Topology::start(TopologyOptions {
        followers: 2,
        apply_delay: APPLY_DELAY,
        memcached: true,
        redis: false,
        ..TopologyOptions::default()
    })
    .await
    .context("starting the servers")?;
    let memcached = topology.memcached_addr().context("memcached")?.to_owned();
    let mut reports: Vec<Report> = Vec::new();
    for mode in [Mode::Time, Mode::Causal] {
        let options = DemoOptions {
            leader_url: topology.leader_url().to_owned(),
            follower_urls: topology.follower_urls().to_vec(),
            memcached_addr: memcached.clone(),
            mode,
            duration: Duration::from_secs(20),
            sessions: 16,
            post_share: 0.2,
            lag_window: Duration::from_secs(2),
            monotonic_reads: false,
        };
        reports.push(distributed_demo::run(&options, |_| {}).await?);
    }
    topology.shutdown().await?;

    let share = |r: &Report| {
        let routed = r.reads_on("follower") + r.reads_on("leader");
        100.0 * r.reads_on("follower") as f64 / routed.max(1) as f64
    };
    let time_share = share(&reports[0]);
    println!(
        "| mode | routed reads | follower share | vs time mode | own-write stale | naive follower read stale |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {:.1}% | {:.2}x | {} of {} | {} of {} |",
            r.mode,
            r.reads_on("follower") + r.reads_on("leader"),
            share(r),
            share(r) / time_share.max(f64::MIN_POSITIVE),
            r.own_stale,
            r.own_checks,
            r.naive_stale,
            r.naive_checks,
        );
    }
    Ok(())
}
