//! One routing decision (a fresh request scope, one pin lookup in the in-memory cache, a
//! follower pick) against the cheapest thing it could be: a bare `HashMap` lookup of the same
//! key. Both run in the same harness and runtime, so their ratio survives a noisy machine.
//!
//! `cargo bench -p distributed-core --bench routing`

#![allow(missing_docs, clippy::expect_used)] // a bench binary: criterion_group! makes undocumented items; set-up failing is fatal anyway

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use distributed_core::{
    Config, DistributedRouter, MemoryCache, Router, Scope, ScopeKey, SessionCachedRouter,
};

const SCOPES: usize = 1024;

fn routing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    let config = Config::builder()
        .leader("leader", "postgres://leader/app")
        .follower("f1", "postgres://f1/app")
        .follower("f2", "postgres://f2/app")
        .lag_window(Duration::from_secs(3600))
        .build()
        .expect("valid config");
    let router = DistributedRouter::new(
        config.clone(),
        SessionCachedRouter::new(MemoryCache::new(), config.lag_window()),
    );
    let keys: Vec<ScopeKey> = (0..SCOPES)
        .map(|i| ScopeKey::from(format!("session-{i:08}")))
        .collect();
    let mut baseline: HashMap<String, bool> = HashMap::new();
    // Every other scope has written recently: half the decisions pin, half pick a follower.
    rt.block_on(async {
        for (i, key) in keys.iter().enumerate() {
            if i % 2 == 0 {
                let scope = Scope::new(key.clone());
                router
                    .record_write(Some(&scope), None, None)
                    .await
                    .expect("memory cache");
            }
            baseline.insert(format!("distributed:pin:s:{}", key.as_str()), i % 2 == 0);
        }
    });

    let mut group = c.benchmark_group("routing");
    let mut i = 0usize;
    group.bench_function("hashmap_lookup_baseline", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % SCOPES;
            let key = format!("distributed:pin:s:{}", keys[i].as_str());
            let found = baseline.get(&key).copied();
            async move { black_box(found) }
        })
    });
    let mut i = 0usize;
    group.bench_function("route_read_memory_cache", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % SCOPES;
            let scope = Scope::new(keys[i].clone());
            let router = &router;
            async move { black_box(router.route_read(Some(&scope), None).await) }
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
