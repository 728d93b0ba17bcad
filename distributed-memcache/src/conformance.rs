//! The cache conformance suite: what every [`Cache`] backend must do, written once and run
//! against `MemoryCache` (unit tests), memcached and Redis (integration tests against real
//! servers, under `cargo xtask integration-test`).
//!
//! Each check panics with a message saying what the backend got wrong, as an assertion does.
//! Every key a check writes starts with the `prefix` it is given, so that tests sharing one
//! server do not see each other's keys.
//!
//! ```
//! use std::sync::Arc;
//! use distributed_core::MemoryCache;
//! use distributed_memcache::conformance::{self, Expectations};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap().block_on(async {
//! conformance::run(Arc::new(MemoryCache::new()), "doc:", &Expectations::memory()).await;
//! # });
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use distributed_core::{Cache, CacheError};
use tokio::task::JoinSet;

/// What a backend promises beyond the [`Cache`] trait: its limits and its clock.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Expectations {
    /// The largest value it stores, or `None` when it has no limit of its own.
    pub max_value_size: Option<usize>,
    /// How long past its time to live an entry may still be read (memcached counts whole
    /// seconds on a once-a-second clock).
    pub expiry_slack: Duration,
    /// The longest a call may take as its caller sees it: the backend's timeout.
    pub call_timeout: Duration,
    /// How long the backend may take to serve again once its server is back.
    pub recovery: Duration,
}

impl Expectations {
    /// The in-process `MemoryCache`: no limit, exact expiry, never slow.
    pub fn memory() -> Self {
        Self {
            max_value_size: None,
            expiry_slack: Duration::from_millis(50),
            call_timeout: Duration::from_millis(100),
            recovery: Duration::ZERO,
        }
    }

    /// A [`MemcacheCache`](crate::MemcacheCache): its value limit and timeout; expiry up to
    /// 2.5 s late (one second of rounding up, one of memcached's clock, and some room).
    pub fn memcached(cache: &crate::MemcacheCache) -> Self {
        Self {
            max_value_size: Some(cache.max_value_size()),
            expiry_slack: Duration::from_millis(2_500),
            call_timeout: cache.timeout(),
            recovery: Duration::from_secs(10),
        }
    }

    /// A `RedisCache`: its value limit and timeout; millisecond expiry.
    #[cfg(feature = "redis")]
    pub fn redis(cache: &crate::RedisCache) -> Self {
        Self {
            max_value_size: Some(cache.max_value_size()),
            expiry_slack: Duration::from_millis(250),
            call_timeout: cache.timeout(),
            recovery: Duration::from_secs(10),
        }
    }
}

/// Stops and starts the one server a backend talks to, for [`survives_restart`].
#[async_trait]
pub trait ServerControl: Send + Sync {
    /// Kills the server; calls must now fail, typed and fast.
    async fn stop(&self);
    /// Starts it again, on the same address, and returns once it answers.
    async fn start(&self);
}

/// Runs every check that needs no control over the server.
pub async fn run<C: Cache + ?Sized + 'static>(cache: Arc<C>, prefix: &str, expect: &Expectations) {
    get_set_delete(&*cache, prefix).await;
    hostile_keys(&*cache, prefix).await;
    oversized_values(&*cache, prefix, expect).await;
    concurrent_access(Arc::clone(&cache), prefix).await;
    ttl_expiry(&*cache, prefix, expect).await;
}

fn ok<T>(result: Result<T, CacheError>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

const TTL: Duration = Duration::from_secs(60);

/// A missing key reads as `None`; a set value reads back; set replaces; delete removes, and
/// deleting a missing key is fine; an empty value is a value.
pub async fn get_set_delete<C: Cache + ?Sized>(cache: &C, prefix: &str) {
    let key = format!("{prefix}basic");
    ok(cache.delete(&key).await, "delete before the test");
    assert_eq!(
        ok(cache.get(&key).await, "get missing"),
        None,
        "missing key"
    );
    ok(cache.set(&key, b"one", TTL).await, "set");
    assert_eq!(
        ok(cache.get(&key).await, "get"),
        Some(b"one".to_vec()),
        "set then get"
    );
    ok(cache.set(&key, b"two", TTL).await, "set again");
    assert_eq!(
        ok(cache.get(&key).await, "get"),
        Some(b"two".to_vec()),
        "set replaces"
    );
    ok(cache.delete(&key).await, "delete");
    assert_eq!(ok(cache.get(&key).await, "get"), None, "delete removes");
    ok(cache.delete(&key).await, "delete a missing key");

    let empty = format!("{prefix}empty");
    ok(cache.set(&empty, b"", TTL).await, "set an empty value");
    assert_eq!(
        ok(cache.get(&empty).await, "get"),
        Some(Vec::new()),
        "an empty value is present"
    );
    let binary: Vec<u8> = (0..=255).collect();
    ok(cache.set(&empty, &binary, TTL).await, "set binary");
    assert_eq!(
        ok(cache.get(&empty).await, "get"),
        Some(binary),
        "any bytes"
    );
    ok(cache.delete(&empty).await, "delete");
}

/// Keys no memcached would take as they are: all stored apart, none colliding.
pub async fn hostile_keys<C: Cache + ?Sized>(cache: &C, prefix: &str) {
    let long = "k".repeat(10 * 1024);
    let suffixes = [
        String::new(),
        " ".to_owned(),
        "two words".to_owned(),
        "line\r\nbreak".to_owned(),
        "\r\nset injected 0 0 1\r\nx\r\n".to_owned(),
        "nul\0and\u{1}\u{7f}controls".to_owned(),
        "ключ 🔑 鍵".to_owned(),
        long.clone(),
        format!("{long}x"),
        format!("{long}y"),
    ];
    let keys: Vec<String> = suffixes.iter().map(|s| format!("{prefix}{s}")).collect();
    for (i, key) in keys.iter().enumerate() {
        ok(
            cache.set(key, i.to_string().as_bytes(), TTL).await,
            "set a hostile key",
        );
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            ok(cache.get(key).await, "get a hostile key"),
            Some(i.to_string().into_bytes()),
            "hostile key {i} ({} bytes) reads its own value",
            key.len()
        );
    }
    ok(cache.delete(&keys[3]).await, "delete a hostile key");
    assert_eq!(ok(cache.get(&keys[3]).await, "get"), None);
    assert_eq!(
        ok(cache.get(&keys[4]).await, "get"),
        Some(b"4".to_vec()),
        "deleting one hostile key left the others"
    );
    // The injection attempt stored nothing under the key it spelled.
    assert_eq!(ok(cache.get("injected").await, "get"), None);
    for key in &keys {
        ok(cache.delete(key).await, "delete");
    }
}

/// A value over the limit is refused, typed, and leaves the stored value alone; a value at
/// the limit is stored whole. Without a limit, a 2 MiB value round-trips.
pub async fn oversized_values<C: Cache + ?Sized>(cache: &C, prefix: &str, expect: &Expectations) {
    let key = format!("{prefix}large");
    ok(cache.set(&key, b"before", TTL).await, "set");
    match expect.max_value_size {
        Some(limit) => {
            let too_large = vec![b'x'; limit + 1];
            match cache.set(&key, &too_large, TTL).await {
                Err(CacheError::ValueTooLarge { size, limit: l }) => {
                    assert_eq!((size, l), (limit + 1, limit), "the error's sizes");
                }
                other => {
                    panic!("a value of limit + 1 bytes: expected ValueTooLarge, got {other:?}")
                }
            }
            assert_eq!(
                ok(cache.get(&key).await, "get"),
                Some(b"before".to_vec()),
                "a refused value wrote nothing"
            );
            let at_limit: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
            ok(
                cache.set(&key, &at_limit, TTL).await,
                "a value at the limit",
            );
            assert!(
                ok(cache.get(&key).await, "get") == Some(at_limit),
                "a value at the limit reads back whole"
            );
        }
        None => {
            let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
            ok(cache.set(&key, &big, TTL).await, "a 2 MiB value");
            assert!(ok(cache.get(&key).await, "get") == Some(big));
        }
    }
    ok(cache.delete(&key).await, "delete");
}

/// Many tasks at once, each on keys of its own and all on one shared key: every task reads
/// what it wrote, and the shared key holds one whole value some task wrote.
pub async fn concurrent_access<C: Cache + ?Sized + 'static>(cache: Arc<C>, prefix: &str) {
    const TASKS: usize = 32;
    const ROUNDS: usize = 20;
    let shared = format!("{prefix}shared");
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let (cache, own, shared) = (
            Arc::clone(&cache),
            format!("{prefix}task-{task}"),
            shared.clone(),
        );
        tasks.spawn(async move {
            for round in 0..ROUNDS {
                let value = format!("{task}:{round}:{}", "v".repeat(task * 7));
                ok(
                    cache.set(&own, value.as_bytes(), TTL).await,
                    "concurrent set",
                );
                assert_eq!(
                    ok(cache.get(&own).await, "concurrent get"),
                    Some(value.clone().into_bytes()),
                    "task {task} round {round} reads its own write"
                );
                ok(
                    cache.set(&shared, value.as_bytes(), TTL).await,
                    "concurrent set of the shared key",
                );
            }
            ok(cache.delete(&own).await, "concurrent delete");
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let last = ok(cache.get(&shared).await, "get the shared key");
    let last = String::from_utf8(last.unwrap_or_default()).unwrap_or_default();
    let whole = last.split(':').collect::<Vec<_>>();
    assert!(
        whole.len() == 3
            && whole[0]
                .parse::<usize>()
                .is_ok_and(|t| t < TASKS && whole[2].len() == t * 7),
        "the shared key holds one whole value, not {last:?}"
    );
    ok(cache.delete(&shared).await, "delete");
}

/// An entry lives at least its TTL and is gone within the backend's slack after it; a
/// sub-second TTL expires too (memcached must not round it down to 0, "forever"); a zero TTL
/// stores nothing.
pub async fn ttl_expiry<C: Cache + ?Sized>(cache: &C, prefix: &str, expect: &Expectations) {
    let ttl = Duration::from_secs(1);
    let (long, short, zero) = (
        format!("{prefix}ttl-long"),
        format!("{prefix}ttl-short"),
        format!("{prefix}ttl-zero"),
    );
    let started = Instant::now();
    ok(cache.set(&long, b"v", ttl).await, "set with a TTL");
    ok(
        cache.set(&short, b"v", Duration::from_millis(100)).await,
        "set with a sub-second TTL",
    );
    let set_done = Instant::now();
    let read = ok(cache.get(&long).await, "get before expiry");
    // Only a read that ended within the TTL proves anything (a stalled machine may be late).
    if started.elapsed() < ttl {
        assert_eq!(read, Some(b"v".to_vec()), "an entry lives for its TTL");
    }
    ok(cache.set(&zero, b"v", TTL).await, "set");
    ok(
        cache.set(&zero, b"v", Duration::ZERO).await,
        "set with a zero TTL",
    );
    assert_eq!(
        ok(cache.get(&zero).await, "get"),
        None,
        "a zero TTL stores nothing"
    );

    tokio::time::sleep_until((set_done + ttl + expect.expiry_slack).into()).await;
    assert_eq!(
        ok(cache.get(&long).await, "get after expiry"),
        None,
        "expired after its TTL and the backend's slack"
    );
    assert_eq!(
        ok(cache.get(&short).await, "get after expiry"),
        None,
        "a sub-second TTL expires (it is not 'forever')"
    );
}

/// The server is stopped in the middle of a loop of calls and started again: while it is down
/// every call fails with an "unavailable" error ([`CacheError::is_unavailable`]) within the
/// call timeout (plus a second of scheduling room), never with a wrong answer; once it is
/// back, the same backend serves again within [`Expectations::recovery`], without being
/// rebuilt. Returns how long recovery took.
pub async fn survives_restart<C: Cache + ?Sized>(
    cache: &C,
    server: &dyn ServerControl,
    prefix: &str,
    expect: &Expectations,
) -> Duration {
    let bound = expect.call_timeout + Duration::from_secs(1);
    let key = format!("{prefix}restart");
    for round in 0..10 {
        ok(cache.set(&key, b"up", TTL).await, "set while up");
        assert_eq!(
            ok(cache.get(&key).await, "get while up"),
            Some(b"up".to_vec())
        );
        let _ = round;
    }

    server.stop().await;
    for round in 0..10 {
        let key = format!("{key}-{round}");
        let started = Instant::now();
        let set = cache.set(&key, b"down", TTL).await;
        let get = cache.get(&key).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed <= 2 * bound,
            "round {round}: two calls to a down server took {elapsed:?}"
        );
        for (what, error) in [("set", set.err()), ("get", get.err())] {
            match error {
                Some(e) if e.is_unavailable() => {}
                Some(e) => panic!("round {round}: {what} on a down server: {e:?}"),
                None => panic!("round {round}: {what} on a down server succeeded"),
            }
        }
    }

    server.start().await;
    let back = Instant::now();
    loop {
        let started = Instant::now();
        let set = cache.set(&key, b"again", TTL).await;
        let get = cache.get(&key).await;
        assert!(started.elapsed() <= 2 * bound, "calls after the restart");
        match (set, get) {
            (Ok(()), Ok(Some(value))) if value == b"again" => break,
            (Ok(()), Ok(other)) => panic!("after the restart, read {other:?}"),
            (set, get) => {
                for e in [set.err(), get.err()].into_iter().flatten() {
                    assert!(e.is_unavailable(), "while recovering: {e:?}");
                }
                assert!(
                    back.elapsed() < expect.recovery,
                    "not serving {:?} after the server came back",
                    expect.recovery
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let recovered = back.elapsed();
    ok(cache.delete(&key).await, "delete after recovery");
    recovered
}

#[cfg(test)]
mod tests {
    use distributed_core::MemoryCache;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_cache_conforms() {
        run(
            Arc::new(MemoryCache::new()),
            "memory:",
            &Expectations::memory(),
        )
        .await;
    }

    /// A cache that forgets, to prove the suite can fail.
    struct Forgetful;

    #[async_trait]
    impl Cache for Forgetful {
        async fn get(&self, _: &str) -> Result<Option<Vec<u8>>, CacheError> {
            Ok(None)
        }
        async fn set(&self, _: &str, _: &[u8], _: Duration) -> Result<(), CacheError> {
            Ok(())
        }
        async fn delete(&self, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
    }

    #[tokio::test]
    #[should_panic(expected = "set then get")]
    async fn the_suite_can_fail() {
        get_set_delete(&Forgetful, "x").await;
    }

    /// A cache that truncates keys as a careless memcached client would.
    struct Truncating(MemoryCache);

    #[async_trait]
    impl Cache for Truncating {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
            self.0.get(&key[..key.len().min(250)]).await
        }
        async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
            self.0.set(&key[..key.len().min(250)], value, ttl).await
        }
        async fn delete(&self, key: &str) -> Result<(), CacheError> {
            self.0.delete(&key[..key.len().min(250)]).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "reads its own value")]
    async fn colliding_keys_fail() {
        hostile_keys(&Truncating(MemoryCache::new()), "x").await;
    }
}
