//! Background tasks that cannot die silently.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The first pause before a panicked task runs again; it doubles with each panic in a row, up
/// to [`MAX_RESTART_PAUSE`], so a task that panics at once does not spin.
const FIRST_RESTART_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two runs of a task that keeps panicking.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(10);
/// A run that lasted this long was healthy: the next panic starts the pauses over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Spawns `task()` on the current tokio runtime and keeps it running: when a run panics, the
/// panic is logged (error level, with the task's `name`) and counted (the counter
/// `distributed_task_restarts_total{task = name}`), and a fresh run of `task()` starts after a
/// pause (100 ms, doubling with each panic in a row, at most 10 s). A run that returns ends
/// the supervision; aborting the returned handle stops the task for good.
///
/// `task` builds each run from scratch, so a run must not rely on anything the panicked one
/// left half done (see [`spawn_monitor`](crate::spawn_monitor), whose loops hold no state
/// between probes).
///
/// Must be called inside a tokio runtime.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let runs = Arc::new(AtomicU32::new(0));
/// let counted = runs.clone();
/// let task = distributed_core::spawn_supervised("flaky", move || {
///     let counted = counted.clone();
///     async move {
///         if counted.fetch_add(1, Ordering::SeqCst) == 0 {
///             panic!("the first run fails");
///         }
///     }
/// });
/// task.await.unwrap();
/// assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once, then returned");
/// # });
/// ```
pub fn spawn_supervised<F, Fut>(name: &'static str, mut task: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut pause = FIRST_RESTART_PAUSE;
        loop {
            let started = Instant::now();
            let Err(panic) = AssertUnwindSafe(task()).catch_unwind().await else {
                return;
            };
            if started.elapsed() >= HEALTHY_RUN {
                pause = FIRST_RESTART_PAUSE;
            }
            metrics::counter!("distributed_task_restarts_total", "task" => name).increment(1);
            tracing::error!(
                task = name,
                panic = panic_message(panic.as_ref()),
                restart_in_ms = pause.as_millis() as u64,
                "background task panicked; restarting it"
            );
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(MAX_RESTART_PAUSE);
        }
    })
}

/// The text a panic was raised with, when it has one.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_with_growing_pauses_and_logged() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let started = Instant::now();
        let task = spawn_supervised("test", move || {
            let counted = counted.clone();
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) < 3 {
                    panic!("run failed");
                }
            }
        });
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        // 100 + 200 + 400 ms of pauses.
        assert!(started.elapsed() >= Duration::from_millis(700));
        assert!(started.elapsed() < Duration::from_millis(800));
    }

    #[test]
    fn panic_messages_are_found() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&7_u8), "(not a string)");
    }
}
