//! get and set latency (p50, p99) and throughput at 1, 16 and 64 concurrent tasks, for memcached
//! through `r2d2_memcache`, memcached through one shared `memcache::Client` (text protocol, the
//! default, and binary protocol), and Redis, in one run. Criterion reports means, not tails, so this is a small harness of its own: every call is
//! timed and the percentiles are read from the sorted samples.
//!
//! ```text
//! cargo bench -p distributed-memcache --features redis --bench cache
//! ```
//!
//! Servers come from `DISTRIBUTED_MEMCACHED_ADDR` and `DISTRIBUTED_REDIS_URL` when set (as
//! `cargo xtask topology up` prints them), else the harness starts its own memcached and
//! redis-server on free loopback ports and stops them at the end. `BENCH_OPS` sets the calls per
//! cell (default 20000). Ratios are throughput against `r2d2_memcache` at the same concurrency,
//! measured in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributed_core::Cache;
use distributed_memcache::{MemcacheCache, MemcacheClient, RedisCache};

const CONCURRENCY: [usize; 3] = [1, 16, 64];
const VALUE: [u8; 100] = [b'v'; 100];
const KEYS_PER_TASK: usize = 100;

struct Servers {
    memcached: String,
    redis: String,
    children: Vec<Child>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn servers() -> Servers {
    let mut children = Vec::new();
    let memcached = std::env::var("DISTRIBUTED_MEMCACHED_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| {
            let port = free_port();
            let program = distributed_testkit::memcached_program().expect("memcached");
            let mut cmd = Command::new(program);
            cmd.args([
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-m",
                "64",
            ]);
            if std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
                .unwrap_or(false)
            {
                cmd.args(["-u", "nobody"]);
            }
            children.push(
                cmd.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            format!("127.0.0.1:{port}")
        });
    let redis = std::env::var("DISTRIBUTED_REDIS_URL")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| {
            let port = free_port();
            let program = distributed_testkit::redis_program().expect("redis-server");
            let child = Command::new(program)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            children.push(child);
            format!("redis://127.0.0.1:{port}")
        });
    Servers {
        memcached,
        redis,
        children,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Get,
    Set,
}

struct Cell {
    backend: &'static str,
    op: &'static str,
    tasks: usize,
    p50: Duration,
    p99: Duration,
    per_second: f64,
    errors: usize,
}

async fn measure(
    cache: Arc<dyn Cache>,
    op: Op,
    tasks: usize,
    ops: usize,
) -> (Vec<u64>, f64, usize) {
    let per_task = ops.div_ceil(tasks);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let cache = Arc::clone(&cache);
        handles.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_task);
            let mut errors = 0;
            for i in 0..per_task {
                let key = format!("bench:{task}:{}", i % KEYS_PER_TASK);
                let call = Instant::now();
                let ok = match op {
                    Op::Get => cache.get(&key).await.is_ok_and(|v| v.is_some()),
                    Op::Set => cache
                        .set(&key, &VALUE, Duration::from_secs(300))
                        .await
                        .is_ok(),
                };
                samples.push(u64::try_from(call.elapsed().as_nanos()).unwrap_or(u64::MAX));
                errors += usize::from(!ok);
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::with_capacity(per_task * tasks);
    let mut errors = 0;
    for handle in handles {
        let (samples, e) = handle.await.unwrap();
        all.extend(samples);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    let per_second = all.len() as f64 / wall;
    all.sort_unstable();
    (all, per_second, errors)
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    Duration::from_nanos(sorted[rank - 1])
}

async fn fill(cache: &dyn Cache) {
    for task in 0..*CONCURRENCY.iter().max().unwrap() {
        for i in 0..KEYS_PER_TASK {
            cache
                .set(
                    &format!("bench:{task}:{i}"),
                    &VALUE,
                    Duration::from_secs(300),
                )
                .await
                .unwrap();
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing. Only run for real
    // under `cargo bench`, so that test runs stay fast.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let ops: usize = std::env::var("BENCH_OPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let servers = servers();
    runtime.block_on(async {
        // Generous timeouts: this measures speed, not failure.
        let timeout = Duration::from_secs(2);
        let memcache = |client, protocol: &str| {
            let addr = servers.memcached.trim_start_matches("memcache://");
            MemcacheCache::builder()
                .server(format!("memcache://{addr}?protocol={protocol}"))
                .namespace("bench:")
                .client(client)
                .connect_timeout(timeout)
                .io_timeout(timeout)
                .timeout(timeout)
                .build()
                .unwrap()
        };
        let backends: Vec<(&'static str, Arc<dyn Cache>)> = vec![
            (
                "r2d2_memcache",
                Arc::new(memcache(MemcacheClient::R2d2, "ascii")),
            ),
            (
                "memcache::Client (shared)",
                Arc::new(memcache(MemcacheClient::Shared, "ascii")),
            ),
            (
                "memcache::Client (shared), binary protocol",
                Arc::new(memcache(MemcacheClient::Shared, "binary")),
            ),
            (
                "redis ConnectionManager",
                Arc::new(
                    RedisCache::builder(&servers.redis)
                        .namespace("bench:")
                        .connect_timeout(timeout)
                        .io_timeout(timeout)
                        .timeout(timeout)
                        .build()
                        .unwrap(),
                ),
            ),
        ];
        // Wait for servers the harness started itself.
        for (name, cache) in &backends {
            let deadline = Instant::now() + Duration::from_secs(15);
            while cache
                .set("bench:ready", b"1", Duration::from_secs(5))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "{name} never answered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            fill(cache.as_ref()).await;
        }
        let mut cells = Vec::new();
        for (op, op_name) in [(Op::Get, "get"), (Op::Set, "set")] {
            for tasks in CONCURRENCY {
                for (name, cache) in &backends {
                    // Warm the pools up to this concurrency first.
                    measure(Arc::clone(cache), op, tasks, tasks * 20).await;
                    let (samples, per_second, errors) =
                        measure(Arc::clone(cache), op, tasks, ops).await;
                    cells.push(Cell {
                        backend: name,
                        op: op_name,
                        tasks,
                        p50: percentile(&samples, 0.50),
                        p99: percentile(&samples, 0.99),
                        per_second,
                        errors,
                    });
                }
            }
        }
        print_table(&cells, ops);
    });
    drop(servers);
}

fn print_table(cells: &[Cell], ops: usize) {
    println!("\n{ops} calls per cell, 100-byte values, 2 Tokio workers\n");
    println!("| op | tasks | backend | p50 µs | p99 µs | calls/s | × r2d2_memcache | errors |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for cell in cells {
        let baseline = cells
            .iter()
            .find(|c| c.op == cell.op && c.tasks == cell.tasks && c.backend == "r2d2_memcache")
            .map_or(f64::NAN, |c| c.per_second);
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
            cell.op,
            cell.tasks,
            cell.backend,
            cell.p50.as_secs_f64() * 1e6,
            cell.p99.as_secs_f64() * 1e6,
            cell.per_second,
            cell.per_second / baseline,
            cell.errors
        );
    }
}
