//! Redis against real servers: the conformance suite, a server stopped and restarted mid-loop,
//! and a server that never answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Kind, OwnServer, PATIENT, own_servers_or_skip, unique_prefix};
use distributed_core::{Cache, CacheError};
use distributed_memcache::RedisCache;
use distributed_memcache::conformance::{self, Expectations};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_conforms() {
    let Some(url) = distributed_testkit::redis_or_skip("redis_conforms") else {
        return;
    };
    let cache = RedisCache::builder(url)
        .namespace("test-redis:")
        .connect_timeout(PATIENT)
        .io_timeout(PATIENT)
        .build()
        .unwrap();
    let expect = Expectations::redis(&cache);
    conformance::run(Arc::new(cache), &unique_prefix("conformance"), &expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_restart() {
    if !own_servers_or_skip("redis_survives_a_restart", Kind::Redis) {
        return;
    }
    let server = OwnServer::start(Kind::Redis).await;
    let cache = RedisCache::builder(server.redis_url())
        .connect_timeout(PATIENT)
        .io_timeout(PATIENT)
        .build()
        .unwrap();
    let expect = Expectations::redis(&cache);
    let recovered = conformance::survives_restart(&cache, &server, "restart:", &expect).await;
    eprintln!("serving again {recovered:?} after Redis came back");
}

/// A server that accepts connections and never answers: every call is a timeout, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let cache = RedisCache::builder(format!("redis://{addr}"))
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let error = cache.get("k").await.unwrap_err();
        assert!(matches!(error, CacheError::Timeout(_)), "{error:?}");
        assert!(started.elapsed() < cache.timeout() + Duration::from_secs(1));
    }
    held.abort();
}
