//! The servers a task runs against: started on free ports, torn down on every path, and
//! checked afterwards for anything that survived.

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use distributed_testkit::{Topology, TopologyOptions};

use crate::{child::Interrupts, survivors};

/// A running rig.
pub(crate) struct Rig {
    topology: Topology,
    dir: PathBuf,
    pids: Vec<u32>,
}

impl Rig {
    /// Starts the servers `opts` names; `Ok(Err(code))` when a signal arrived first (what had
    /// started is stopped by then).
    pub(crate) async fn start(
        opts: TopologyOptions,
        interrupts: &mut Interrupts,
    ) -> anyhow::Result<Result<Self, u8>> {
        let started = Instant::now();
        // Dropping the half-started topology on a signal stops what it had started.
        let topology = tokio::select! {
            topology = Topology::start(opts) => topology.context("starting the rig")?,
            code = interrupts.recv() => return Ok(Err(code)),
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
        Ok(Ok(Self {
            dir: topology.dir().to_path_buf(),
            pids: topology.pids(),
            topology,
        }))
    }

    /// The variables that tell tests and the demo where the servers are.
    pub(crate) fn env_vars(&self) -> Vec<(&'static str, String)> {
        self.topology.env_vars()
    }

    /// Stops everything and fails if any process of ours or the directory survived.
    pub(crate) async fn teardown(mut self) -> anyhow::Result<()> {
        // Servers restarted during the run (fault tests) have new pids: check those too.
        self.pids.extend(self.topology.pids());
        let teardown = self.topology.shutdown().await;
        let leftovers = survivors::clean_or_fail(&self.dir, &self.pids);
        teardown.context("tearing the rig down")?;
        leftovers?;
        eprintln!("xtask: rig torn down, nothing left running");
        Ok(())
    }
}
