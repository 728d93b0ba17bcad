//! memcached against real servers: the conformance suite through both clients, placement over
//! several servers, a server stopped and restarted mid-loop, and a server that never answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Kind, OwnServer, PATIENT, own_servers_or_skip, unique_prefix};
use distributed_core::Cache;
use distributed_memcache::conformance::{self, Expectations};
use distributed_memcache::{MemcacheCache, MemcacheClient};

const CLIENTS: [MemcacheClient; 2] = [MemcacheClient::Shared, MemcacheClient::R2d2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memcached_conforms_through_both_clients() {
    let Some(addr) = distributed_testkit::memcached_or_skip("memcached_conforms") else {
        return;
    };
    // Both clients at once: the TTL checks wait seconds each.
    let runs = CLIENTS.map(|client| {
        let prefix = unique_prefix(&format!("conformance-{client:?}"));
        let cache = MemcacheCache::builder()
            .server(&addr)
            .namespace(format!("test-{client:?}:"))
            .client(client)
            .connect_timeout(PATIENT)
            .io_timeout(PATIENT)
            .build()
            .unwrap();
        let expect = Expectations::memcached(&cache);
        tokio::spawn(async move { conformance::run(Arc::new(cache), &prefix, &expect).await })
    });
    for run in runs {
        run.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_on_the_server_the_key_mapper_names() {
    if !own_servers_or_skip("keys_live_on_the_named_server", Kind::Memcached) {
        return;
    }
    let servers = [
        OwnServer::start(Kind::Memcached).await,
        OwnServer::start(Kind::Memcached).await,
        OwnServer::start(Kind::Memcached).await,
    ];
    let addrs: Vec<String> = servers.iter().map(OwnServer::addr).collect();
    let both = MemcacheCache::builder()
        .servers(addrs.clone())
        .build()
        .unwrap();
    let alone: Vec<MemcacheCache> = addrs
        .iter()
        .map(|a| MemcacheCache::new(a.clone()).unwrap())
        .collect();
    let mut per_server = [0; 3];
    for i in 0..60 {
        let key = format!("placed-{i}");
        both.set(&key, b"v", Duration::from_secs(60)).await.unwrap();
        let home = both.key_mapper().server_index(&key, 3);
        per_server[home] += 1;
        for (index, single) in alone.iter().enumerate() {
            let found = single.get(&key).await.unwrap().is_some();
            assert_eq!(found, index == home, "{key} on server {index}");
        }
    }
    assert!(per_server.iter().all(|&n| n > 0), "{per_server:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_restart_through_both_clients() {
    if !own_servers_or_skip("memcached_survives_a_restart", Kind::Memcached) {
        return;
    }
    for client in CLIENTS {
        let server = OwnServer::start(Kind::Memcached).await;
        let cache = MemcacheCache::builder()
            .server(server.addr())
            .client(client)
            // A down server makes r2d2 retry for the whole connect timeout: keep it short.
            .connect_timeout(Duration::from_millis(100))
            .io_timeout(PATIENT)
            .build()
            .unwrap();
        let expect = Expectations::memcached(&cache);
        let recovered = conformance::survives_restart(&cache, &server, "restart:", &expect).await;
        eprintln!("{client:?}: serving again {recovered:?} after memcached came back");
    }
}

/// A server that accepts connections and never answers: every call fails as unavailable (a
/// `Timeout` when a call's own read timed out, `Unavailable` when the pool's ping at checkout did
/// and the pool gave up), on time.
///
/// The runtime is shut down without waiting for blocking threads: through `r2d2_memcache`, a
/// call's thread keeps retrying for r2d2's 30 s connection timeout after its caller gave up.
#[test]
fn a_silent_server_times_out() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        for client in CLIENTS {
            let cache = MemcacheCache::builder()
                .server(addr.to_string())
                .client(client)
                .build()
                .unwrap();
            for _ in 0..3 {
                let started = Instant::now();
                let error = cache.get("k").await.unwrap_err();
                assert!(error.is_unavailable(), "{client:?}: {error:?}");
                assert!(started.elapsed() < cache.timeout() + Duration::from_secs(1));
            }
        }
    });
    runtime.shutdown_background();
}
