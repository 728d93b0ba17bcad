//! End to end through the router: pins in a real memcached, and with memcached stopped, reads
//! go to the leader (`Reason::CacheUnavailable`): not errors, not follower reads. No database
//! is needed: the routing decision is what is tested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Kind, OwnServer, PATIENT, own_servers_or_skip};
use distributed_core::{
    Config, Decision, DistributedRouter, Reason, Router, Scope, SessionCachedRouter, Target,
};
use distributed_memcache::MemcacheCache;
use distributed_memcache::conformance::ServerControl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_memcached_sends_reads_to_the_leader() {
    if !own_servers_or_skip("stopped_memcached_reads_the_leader", Kind::Memcached) {
        return;
    }
    let memcached = OwnServer::start(Kind::Memcached).await;
    let config = Config::builder()
        .leader("leader", "postgres://leader.invalid/app")
        .follower("follower", "postgres://follower.invalid/app")
        .lag_window(Duration::from_secs(5))
        .cache_timeout(3 * PATIENT)
        .build()
        .unwrap();
    let cache = MemcacheCache::builder()
        .server(memcached.addr())
        .connect_timeout(PATIENT)
        .io_timeout(PATIENT)
        .build()
        .unwrap();
    let router = DistributedRouter::new(
        config.clone(),
        SessionCachedRouter::new(cache, config.lag_window()),
    );

    // Up: an idle session reads a follower; a session that wrote reads the leader, in a later
    // request too (the pin went through memcached).
    let idle = router.route_read(Some(&Scope::new("idle")), None).await;
    assert_eq!(idle, Decision::follower(0, Reason::HealthyFollower));
    router
        .record_write(Some(&Scope::new("writer")), Some("posts"), None)
        .await
        .unwrap();
    let later = router.route_read(Some(&Scope::new("writer")), None).await;
    assert_eq!(later, Decision::leader(Reason::RecentWrite));

    // Down: every read, pinned or not, goes to the leader, on time.
    memcached.stop().await;
    for session in ["idle", "writer", "someone-else"] {
        let started = Instant::now();
        let read = router.route_read(Some(&Scope::new(session)), None).await;
        assert_eq!(
            read,
            Decision::leader(Reason::CacheUnavailable),
            "{session}"
        );
        assert!(started.elapsed() < config.cache_timeout() + Duration::from_secs(1));
    }
    // A write's pin cannot be stored: the error says so, and the rest of that request still
    // reads the leader.
    let request = Scope::new("writes-while-down");
    assert!(
        router
            .record_write(Some(&request), Some("posts"), None)
            .await
            .is_err()
    );
    let read = router.route_read(Some(&request), None).await;
    assert_eq!(read.target, Target::Leader);

    // Back: the same router reads followers again and stores pins, without a restart.
    memcached.start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = router.route_read(Some(&Scope::new("idle")), None).await;
        if read == Decision::follower(0, Reason::HealthyFollower) {
            break;
        }
        assert_eq!(read, Decision::leader(Reason::CacheUnavailable));
        assert!(
            Instant::now() < deadline,
            "memcached back, router still failing safe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router
        .record_write(Some(&Scope::new("writer-after")), None, None)
        .await
        .unwrap();
    let later = router
        .route_read(Some(&Scope::new("writer-after")), None)
        .await;
    assert_eq!(later, Decision::leader(Reason::RecentWrite));
}
