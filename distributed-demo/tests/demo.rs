//! The demo, shortened, as a test on the shared rig: in both modes, no visitor misses its own
//! write (signing up before having a session included), no request fails, no logged-out cookie
//! still works, and followers do serve reads — while a naive follower read misses, which shows
//! the lag the library hides is real.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use distributed_demo::{DemoOptions, Mode, Report};
use distributed_testkit::rig_or_skip;

fn options(mode: Mode) -> DemoOptions {
    let mut options = DemoOptions::from_env(mode).unwrap();
    // The demo's own mix (one request in ten a post): more posts would keep every session
    // inside its lag window in time mode, and no read would be a follower's to serve.
    options.duration = Duration::from_secs(8);
    options.sessions = 8;
    options
}

fn check(report: &Report) {
    println!("{}\n", report.summary());
    assert!(
        report.own_checks >= 20,
        "too few own-write checks to mean anything"
    );
    assert_eq!(report.own_stale, 0, "a visitor missed its own write");
    assert_eq!(report.errors, 0, "requests failed");
    assert_eq!(
        report.replays_logged_in, 0,
        "a logged-out cookie still worked"
    );
    assert!(
        report.reads_on("follower") > 0,
        "no read reached a follower"
    );
    assert!(
        report.naive_stale > 0,
        "a naive follower read never missed: the lag is not real, the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_sees_every_own_write_in_both_modes() {
    if rig_or_skip("the_demo_sees_every_own_write_in_both_modes").is_none() {
        return;
    }
    // One after the other: both create the same demo tables.
    for mode in [Mode::Time, Mode::Causal] {
        let report = distributed_demo::run(&options(mode), |_| {}).await.unwrap();
        check(&report);
    }
}
