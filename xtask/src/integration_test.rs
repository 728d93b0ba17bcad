//! `cargo xtask integration-test`: start the rig, run every test of the workspace against it,
//! tear it down, and prove nothing survived.

use std::process::{ExitCode, Stdio};

use distributed_testkit::{TopologyOptions, env};
use tokio::process::Command;

use crate::{
    args::TopologyFlags,
    child::{Interrupts, cargo, run_child},
    prerequisites,
    rig::Rig,
};

/// Runs the task; the exit code is the tests' (or a failure of teardown).
pub(crate) fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let flags = TopologyFlags::parse(args)?;
    prerequisites::ensure()?;
    crate::runtime()?.block_on(run_with_rig(flags))
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
    let rig = match Rig::start(opts, &mut interrupts).await? {
        Ok(rig) => rig,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    let mut vars = rig.env_vars();
    vars.push((env::REQUIRE_RIG, "1".to_owned()));
    let outcome = run_tests(&runner, &vars, &flags.passthrough, &mut interrupts).await;
    let teardown = rig.teardown().await;
    let code = outcome?;
    teardown?;
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
        let mut cmd = cargo(&[self.subcommand(), &COMMON].concat(), &[]);
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
    let mut tests = cargo(&[runner.subcommand(), &COMMON].concat(), vars);
    tests.args(passthrough);
    let tests_code = run_child(tests, interrupts).await?;
    if tests_code >= 128 {
        return Ok(tests_code);
    }
    let doc_code = run_child(
        cargo(&[&["test", "--doc"][..], &COMMON].concat(), vars),
        interrupts,
    )
    .await?;
    Ok(if tests_code != 0 {
        tests_code
    } else {
        doc_code
    })
}
