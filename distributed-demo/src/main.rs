//! `distributed-demo [--mode time|causal] [--monotonic] [--seconds N] [--sessions N]`: run by
//! `cargo xtask demo`, which starts the servers and sets the variables it reads.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use distributed_demo::{DemoOptions, Mode, Report};

fn parse(args: &[String]) -> anyhow::Result<DemoOptions> {
    let mut mode = Mode::Causal;
    let mut seconds = None;
    let mut sessions = None;
    let mut monotonic = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--mode" => {
                mode = match value()?.as_str() {
                    "time" => Mode::Time,
                    "causal" => Mode::Causal,
                    other => bail!("--mode {other:?}: expected time or causal"),
                }
            }
            "--seconds" => seconds = Some(value()?.parse::<u64>().context("--seconds")?),
            "--sessions" => sessions = Some(value()?.parse::<usize>().context("--sessions")?),
            "--monotonic" => monotonic = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let mut options = DemoOptions::from_env(mode)?;
    if let Some(seconds) = seconds {
        options.duration = Duration::from_secs(seconds);
    }
    options.monotonic_reads = monotonic;
    if let Some(sessions) = sessions {
        options.sessions = sessions.max(1);
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = parse(&args).and_then(|options| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        println!(
            "demo: {} sessions for {}s, mode {}{}, lag window {:?}, followers apply WAL {} ms late",
            options.sessions,
            options.duration.as_secs(),
            options.mode.name(),
            if options.monotonic_reads && options.mode == Mode::Causal {
                " with monotonic reads"
            } else {
                ""
            },
            options.lag_window,
            std::env::var(distributed_testkit::env::APPLY_DELAY_MS).unwrap_or_else(|_| "?".into()),
        );
        println!("{}", Report::header());
        runtime.block_on(distributed_demo::run(&options, |live| {
            println!("{}", live.row())
        }))
    });
    match outcome {
        Ok(report) => {
            println!("{}", report.row());
            println!("\n{}", report.summary());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "demo: FAILED: a stale own write, an error, a surviving logout or no follower reads"
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
