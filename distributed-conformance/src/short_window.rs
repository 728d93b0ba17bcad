//! The original package's silent failure: a lag window shorter than the followers' real lag
//! (1 s against 1.5 s there gave 20% stale reads). Here the monitor measures the lag and skips
//! a follower further behind than the window, so a pin that expires too early sends the read
//! to the leader, not to a follower without the write.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use distributed_core::{Reason, Target, with_scope};
use distributed_testkit::rig_or_skip;
use futures_util::StreamExt;
use tokio::time::sleep;

use crate::suite::{builder, connect_to, scope, settle, unique, unwrap};
use crate::{Adapter, Mode, Settings, SwitchableCache, TestRouter};

const SCOPES: i64 = 40;

/// Scopes write, wait until their pin has expired (the window is half the real lag), and read
/// back: 0 misses, the followers skipped as lagging. The control, the same window with the lag
/// guard turned off (as the original had none), does read followers without the write.
pub async fn a_window_shorter_than_the_lag_reads_no_stale_row<A: Adapter>() {
    let Some(rig) = rig_or_skip("a_window_shorter_than_the_lag_reads_no_stale_row") else {
        return;
    };
    let apply_delay = rig.apply_delay();
    let window = apply_delay / 2;
    let pool_with = |max_follower_lag: Duration| {
        let config = builder(
            rig.leader_url(),
            rig.follower_urls(),
            apply_delay,
            Mode::Time,
        )
        .lag_window(window)
        .max_follower_lag(max_follower_lag)
        .build()
        .expect("a valid configuration");
        let router = TestRouter::new(config.clone(), Arc::new(SwitchableCache::default()));
        connect_to::<A>(config, Arc::new(router), Settings::default())
    };
    // The default: followers behind the window are skipped.
    let guarded = pool_with(window).await;
    // The original's behaviour: no lag guard at all.
    let unguarded = pool_with(Duration::from_secs(3600)).await;
    let table = unique("short_window");
    unwrap("create table", guarded.create_table(&table).await);
    settle(apply_delay).await;

    let (stale, lag_skips, control_stale) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    futures_util::stream::iter(0..SCOPES)
        .for_each_concurrent(8, |id| {
            let (guarded, unguarded, table) = (&guarded, &unguarded, table.as_str());
            let (stale, lag_skips, control_stale) = (&stale, &lag_skips, &control_stale);
            async move {
                with_scope(scope(table, &format!("guarded-{id}")), async {
                    unwrap("write", guarded.write(table, id).await);
                })
                .await;
                with_scope(scope(table, &format!("unguarded-{id}")), async {
                    unwrap("write", unguarded.write(table, SCOPES + id).await);
                })
                .await;
                // The pin is over; the followers are still a replication delay behind.
                sleep(window + Duration::from_millis(150)).await;
                with_scope(scope(table, &format!("guarded-{id}")), async {
                    let seen = unwrap("read back", guarded.read(table, id).await);
                    if seen.value != Some(id) {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    if seen.decision.reason == Reason::FollowersLagging {
                        lag_skips.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
                with_scope(scope(table, &format!("unguarded-{id}")), async {
                    let seen = unwrap("control read", unguarded.read(table, SCOPES + id).await);
                    if matches!(seen.decision.target, Target::Follower(_)) && seen.value.is_none() {
                        control_stale.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
            }
        })
        .await;

    let (stale, lag_skips, control_stale) = (
        stale.into_inner(),
        lag_skips.into_inner(),
        control_stale.into_inner(),
    );
    eprintln!(
        "a window of {window:?} against a lag of {apply_delay:?}: {stale} of {SCOPES} stale \
         ({lag_skips} read the leader because the followers lagged); without the lag guard \
         {control_stale} of {SCOPES} were stale"
    );
    assert_eq!(
        stale, 0,
        "reads missed their own writes after a too-short window"
    );
    assert!(
        lag_skips > 0,
        "the lag guard never acted: what kept the reads fresh?"
    );
    assert!(
        control_stale > 0,
        "without the lag guard no read was stale: the window was not shorter than the lag, \
         so this test proves nothing"
    );
}
