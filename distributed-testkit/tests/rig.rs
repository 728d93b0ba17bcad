//! The rig itself, against real servers. Run by `cargo xtask integration-test`; without it every
//! test here skips.

use std::{
    error::Error,
    time::{Duration, Instant},
};

use distributed_testkit::{
    DelayProxy, Topology, TopologyOptions, private_topology_or_skip, rig_or_skip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_postgres::{Client, NoTls};

type TestResult = Result<(), Box<dyn Error>>;

/// Slack for a loaded two-core machine on top of the delays under test.
const MARGIN: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        // Ends with an error when the server goes away, which some tests cause on purpose.
        let _ = connection.await;
    });
    Ok(client)
}

/// A table name no other test (or run) uses.
fn unique_table(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("rig_{test}_{}_{nanos}", std::process::id())
}

async fn count_rows(client: &Client, table: &str) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(&format!("select count(*) from {table}"), &[])
        .await?;
    row.try_get(0)
}

async fn table_exists(client: &Client, table: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("select to_regclass($1) is not null", &[&table])
        .await?;
    row.try_get(0)
}

/// Polls until `table` has `rows` rows on `client` (which may not have the table yet);
/// returns how long that took.
async fn wait_for_rows(
    client: &Client,
    table: &str,
    rows: i64,
) -> Result<Duration, Box<dyn Error>> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if table_exists(client, table).await? && count_rows(client, table).await? == rows {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{table} never reached {rows} rows").into())
}

async fn in_recovery(url: &str) -> Result<bool, Box<dyn Error>> {
    let client = connect(url).await?;
    Ok(client
        .query_one("select pg_is_in_recovery()", &[])
        .await?
        .try_get(0)?)
}

#[tokio::test]
async fn followers_are_in_recovery_and_the_leader_is_not() -> TestResult {
    let Some(rig) = rig_or_skip("followers_are_in_recovery_and_the_leader_is_not") else {
        return Ok(());
    };
    assert!(!rig.follower_urls().is_empty());
    assert!(!in_recovery(rig.leader_url()).await?);
    for follower in rig.follower_urls() {
        assert!(in_recovery(follower).await?, "{follower} is not a follower");
    }
    assert!(rig.health().await?.all_up());
    Ok(())
}

#[tokio::test]
async fn a_write_reaches_followers_only_after_the_apply_delay() -> TestResult {
    let Some(rig) = rig_or_skip("a_write_reaches_followers_only_after_the_apply_delay") else {
        return Ok(());
    };
    let table = unique_table("apply_delay");
    let leader = connect(rig.leader_url()).await?;
    let mut followers = Vec::new();
    for url in rig.follower_urls() {
        followers.push(connect(url).await?);
    }
    leader
        .batch_execute(&format!("create table {table} (id int primary key)"))
        .await?;
    for follower in &followers {
        wait_for_rows(follower, &table, 0).await?;
    }

    leader
        .execute(&format!("insert into {table} values (1)"), &[])
        .await?;
    let written = Instant::now();
    for follower in &followers {
        assert_eq!(count_rows(follower, &table).await?, 0, "visible at once");
    }
    for follower in &followers {
        wait_for_rows(follower, &table, 1).await?;
        let seen_after = written.elapsed();
        // The delay runs from the commit on the leader, a moment before `written`.
        let floor = rig.apply_delay().saturating_sub(Duration::from_millis(100));
        assert!(seen_after >= floor, "visible after {seen_after:?}");
        assert!(
            seen_after <= rig.apply_delay() + MARGIN,
            "visible after {seen_after:?}"
        );
    }
    leader.batch_execute(&format!("drop table {table}")).await?;
    Ok(())
}

#[tokio::test]
async fn the_proxy_adds_its_delay_to_a_round_trip() -> TestResult {
    let Some(rig) = rig_or_skip("the_proxy_adds_its_delay_to_a_round_trip") else {
        return Ok(());
    };
    let one_way = Duration::from_millis(50);
    let proxy = DelayProxy::in_front_of(rig.leader_url(), one_way).await?;

    let direct = connect(rig.leader_url()).await?;
    let far = connect(&proxy.url_for(rig.leader_url())?).await?;
    let select_one = async |client: &Client| -> Result<Duration, tokio_postgres::Error> {
        // Best of three: scheduling noise only ever adds time.
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            client.query_one("select 1", &[]).await?;
            best = best.min(started.elapsed());
        }
        Ok(best)
    };
    let direct_time = select_one(&direct).await?;
    let far_time = select_one(&far).await?;
    assert!(
        far_time >= direct_time + 2 * one_way - Duration::from_millis(5),
        "direct {direct_time:?}, through the proxy {far_time:?}"
    );
    assert!(
        far_time < 2 * one_way + MARGIN,
        "through the proxy {far_time:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_private_topology_survives_crashes_and_paused_replay() -> TestResult {
    let opts = TopologyOptions {
        followers: 1,
        apply_delay: Duration::from_millis(200),
        ..TopologyOptions::default()
    };
    let Some(topology) = private_topology_or_skip(
        "a_private_topology_survives_crashes_and_paused_replay",
        opts,
    )
    .await?
    else {
        return Ok(());
    };
    let table = unique_table("private");
    let leader = connect(topology.leader_url()).await?;
    leader
        .batch_execute(&format!("create table {table} (id int primary key)"))
        .await?;

    // A follower crash: connections fail, and after a restart it streams and catches up.
    topology.stop_follower(0).await?;
    assert!(connect(&topology.follower_urls()[0]).await.is_err());
    leader
        .execute(&format!("insert into {table} values (1)"), &[])
        .await?;
    topology.start_follower(0).await?;
    let follower = connect(&topology.follower_urls()[0]).await?;
    wait_for_rows(&follower, &table, 1).await?;

    // Paused replay: the follower keeps answering with what it had.
    topology.pause_follower_replay(0).await?;
    leader
        .execute(&format!("insert into {table} values (2)"), &[])
        .await?;
    tokio::time::sleep(topology.apply_delays()[0] * 3).await;
    assert_eq!(count_rows(&follower, &table).await?, 1);
    topology.resume_follower_replay(0).await?;
    wait_for_rows(&follower, &table, 2).await?;

    // A leader crash: the follower still serves reads, and streams again after the restart.
    topology.stop_leader().await?;
    assert!(connect(topology.leader_url()).await.is_err());
    assert_eq!(count_rows(&follower, &table).await?, 2);
    topology.start_leader().await?;
    let leader = connect(topology.leader_url()).await?;
    leader
        .execute(&format!("insert into {table} values (3)"), &[])
        .await?;
    wait_for_rows(&follower, &table, 3).await?;

    let dir = topology.dir().to_path_buf();
    topology.shutdown().await?;
    assert!(!dir.exists());
    Ok(())
}

async fn answers(addr: &str, ping: &[u8], pong: &[u8]) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(ping).await?;
        let mut reply = vec![0; pong.len()];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply == pong)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(true))
    )
}

#[tokio::test]
async fn cache_servers_restart_on_their_port_and_drop_stops_everything() -> TestResult {
    let opts = TopologyOptions {
        followers: 0,
        memcached: true,
        redis: true,
        ..TopologyOptions::default()
    };
    let Some(topology) = private_topology_or_skip(
        "cache_servers_restart_on_their_port_and_drop_stops_everything",
        opts,
    )
    .await?
    else {
        return Ok(());
    };
    let memcached = topology.memcached_addr().ok_or("no memcached")?.to_owned();
    let redis = topology
        .redis_url()
        .and_then(|url| url.strip_prefix("redis://"))
        .ok_or("no redis")?
        .to_owned();
    assert!(answers(&memcached, b"version\r\n", b"VERSION ").await);
    assert!(answers(&redis, b"PING\r\n", b"+PONG").await);

    topology.stop_memcached()?;
    topology.stop_redis()?;
    assert!(!answers(&memcached, b"version\r\n", b"VERSION ").await);
    assert!(!answers(&redis, b"PING\r\n", b"+PONG").await);
    topology.start_memcached().await?;
    topology.start_redis().await?;
    assert!(answers(&memcached, b"version\r\n", b"VERSION ").await);
    assert!(answers(&redis, b"PING\r\n", b"+PONG").await);

    let pids = topology.pids();
    assert_eq!(pids.len(), 3, "leader, memcached, redis: {pids:?}");
    let dir = topology.dir().to_path_buf();
    drop(topology);
    for pid in pids {
        assert!(!alive(pid), "{pid} survived the drop");
    }
    assert!(!dir.exists());
    Ok(())
}

/// Whether `pid` is a live process (zombies are dead).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn topology_from_env_matches_the_helper() -> TestResult {
    let from_env = Topology::from_env()?;
    let helper = rig_or_skip("topology_from_env_matches_the_helper");
    assert_eq!(
        from_env.map(|rig| rig.leader_url().to_owned()),
        helper.map(|rig| rig.leader_url().to_owned())
    );
    Ok(())
}
