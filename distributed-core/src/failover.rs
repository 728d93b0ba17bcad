//! Retrying a read on the next server when a follower fails under it.

use std::future::Future;

use crate::{Decision, Router, Scope, Target};

/// Runs the read `op` where `router` sends it; when it fails on a follower with an error that
/// `is_unavailable` says means "that server is gone" (a refused or broken connection, not a
/// bad query), marks the follower down and runs it again on the next choice, so the caller
/// never sees a follower's failure. At most one attempt per follower plus one on the leader.
///
/// A follower marked down here comes back through the [monitor](crate::spawn_monitor).
///
/// # Errors
/// The error of the last attempt: a query error, or a leader failure.
pub async fn read_with_failover<R, T, E, F, Fut>(
    router: &R,
    scope: Option<&Scope>,
    table: Option<&str>,
    is_unavailable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    R: Router + ?Sized,
    F: FnMut(Decision) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts_left = router.followers().len() + 1;
    loop {
        let decision = router.route_read(scope, table).await;
        attempts_left -= 1;
        match (op(decision).await, decision.target) {
            (Err(e), Target::Follower(index)) if attempts_left > 0 && is_unavailable(&e) => {
                tracing::warn!(
                    follower = router.followers().name(index),
                    "read failed on an unreachable follower; retrying elsewhere"
                );
                metrics::counter!("distributed_read_failovers_total").increment(1);
                router.followers().mark_down(index);
            }
            (outcome, _) => return outcome,
        }
    }
}

/// The SQLSTATE PostgreSQL answers a write with on a read-only connection or server
/// (`read_only_sql_transaction`): what a write sent through a read handle gets from a follower.
pub const READ_ONLY_SQLSTATE: &str = "25006";

/// Whether a PostgreSQL error with SQLSTATE `code` means "this server cannot serve you now"
/// (so the same read may succeed elsewhere), rather than "this statement is wrong".
///
/// True for the connection exceptions (class `08`), the errors a stopping or starting server
/// sends (`57P01` admin shutdown, `57P02` crash shutdown, `57P03` cannot connect now) and
/// `53300` too many connections.
///
/// ```
/// use distributed_core::is_unavailable_sqlstate;
/// assert!(is_unavailable_sqlstate("57P01"));
/// assert!(is_unavailable_sqlstate("08006"));
/// assert!(!is_unavailable_sqlstate("23505")); // unique violation: the statement's fault
/// ```
pub fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::{Config, DistributedRouter, MemoryCache, RoundRobinPicker, SessionCachedRouter};

    #[derive(Debug, PartialEq)]
    enum DbError {
        Connection,
        Query,
    }

    fn router() -> DistributedRouter<SessionCachedRouter<MemoryCache>, RoundRobinPicker> {
        let config = Config::builder()
            .leader("l", "l")
            .follower("a", "a")
            .follower("b", "b")
            .build()
            .unwrap();
        let pins = SessionCachedRouter::new(MemoryCache::new(), Duration::from_secs(1));
        DistributedRouter::with_picker(config, pins, RoundRobinPicker::default())
    }

    #[tokio::test]
    async fn a_dead_follower_is_skipped_invisibly() {
        let r = router();
        let tried = Mutex::new(Vec::new());
        let out = read_with_failover(
            &r,
            None,
            None,
            |e| *e == DbError::Connection,
            |d| {
                tried.lock().unwrap().push(d.target);
                async move {
                    match d.target {
                        Target::Follower(0) => Err(DbError::Connection),
                        t => Ok(t),
                    }
                }
            },
        )
        .await;
        assert_eq!(out, Ok(Target::Follower(1)));
        assert!(!r.followers().is_up(0));
        assert_eq!(
            tried.into_inner().unwrap(),
            vec![Target::Follower(0), Target::Follower(1)]
        );
    }

    #[tokio::test]
    async fn every_follower_dead_means_the_leader() {
        let r = router();
        let out = read_with_failover(
            &r,
            None,
            None,
            |e| *e == DbError::Connection,
            |d| async move {
                match d.target {
                    Target::Follower(_) => Err(DbError::Connection),
                    Target::Leader => Ok(d.reason),
                }
            },
        )
        .await;
        assert_eq!(out, Ok(crate::Reason::NoHealthyFollower));
    }

    #[tokio::test]
    async fn query_errors_are_not_retried() {
        let r = router();
        let calls = Mutex::new(0);
        let out: Result<(), _> = read_with_failover(
            &r,
            None,
            None,
            |e| *e == DbError::Connection,
            |_| {
                *calls.lock().unwrap() += 1;
                async { Err(DbError::Query) }
            },
        )
        .await;
        assert_eq!(out, Err(DbError::Query));
        assert_eq!(*calls.lock().unwrap(), 1);
        assert!(r.followers().is_up(0) && r.followers().is_up(1));
    }
}
