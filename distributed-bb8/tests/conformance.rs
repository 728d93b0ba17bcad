//! The workspace's routing conformance suite, against `distributed-bb8` and real servers
//! (`cargo xtask integration-test`; skipped without a rig).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use distributed_bb8::{DistributedPool, Error, ReadConnection};
use distributed_conformance::{Adapter, Mode, Observed, Settings, TestRouter};
use distributed_core::{Config, Decision, FollowerSet, NodeProbe};

struct Bb8(DistributedPool<Arc<TestRouter>>);

fn insert(table: &str) -> String {
    format!("insert into {table} (id) values ($1)")
}

fn select(table: &str) -> String {
    format!("select id from {table} where id = $1")
}

async fn observe(conn: &ReadConnection, table: &str, id: i64) -> Result<Observed, Error> {
    let row = conn.query_opt(&select(table), &[&id]).await?;
    Ok(Observed {
        value: row.map(|row| row.get(0)),
        decision: conn.decision(),
    })
}

#[async_trait]
impl Adapter for Bb8 {
    type Error = Error;

    async fn connect(
        config: Config,
        router: Arc<TestRouter>,
        settings: Settings,
    ) -> Result<Self, Error> {
        DistributedPool::builder(config, router)
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.leader_timeout)
            .follower_acquire_timeout(settings.follower_timeout)
            .track_commit_position(settings.track_commit_position)
            .connect()
            .await
            .map(Bb8)
    }

    fn followers(&self) -> &FollowerSet {
        self.0.followers()
    }

    fn probe(&self) -> Arc<dyn NodeProbe> {
        self.0.probe()
    }

    async fn create_table(&self, table: &str) -> Result<(), Error> {
        let conn = self
            .0
            .leader()
            .get()
            .await
            .map_err(Error::LeaderUnavailable)?;
        let ddl = format!("create table {table} (id bigint primary key)");
        conn.batch_execute(&ddl).await?;
        Ok(())
    }

    async fn write(&self, table: &str, id: i64) -> Result<(), Error> {
        self.0.execute(&insert(table), &[&id]).await?;
        Ok(())
    }

    async fn write_in_transaction(&self, table: &str, id: i64) -> Result<(), Error> {
        let sql = insert(table);
        self.0
            .transaction(|tx| {
                Box::pin(async move {
                    tx.execute(&sql, &[&id]).await?;
                    Ok::<_, Error>(())
                })
            })
            .await
    }

    async fn read(&self, table: &str, id: i64) -> Result<Observed, Error> {
        let conn = self.0.read().await?;
        observe(&conn, table, id).await
    }

    async fn read_leader(&self, table: &str, id: i64) -> Result<Observed, Error> {
        let conn = self.0.read_leader().await?;
        observe(&conn, table, id).await
    }

    async fn read_with_failover(&self, table: &str, id: i64) -> Result<Observed, Error> {
        let sql = select(table);
        let sql = sql.as_str();
        self.0
            .read_with(|conn| async move {
                let row = conn.query_opt(sql, &[&id]).await?;
                Ok(Observed {
                    value: row.map(|row| row.get(0)),
                    decision: conn.decision(),
                })
            })
            .await
    }

    async fn write_through_read_handle(
        &self,
        table: &str,
        id: i64,
        leader: bool,
    ) -> Result<Decision, Error> {
        let conn = if leader {
            self.0.read_leader().await?
        } else {
            self.0.read().await?
        };
        conn.execute(&insert(table), &[&id]).await?;
        Ok(conn.decision())
    }

    fn is_read_only(error: &Error) -> bool {
        matches!(error, Error::ReadOnly(_))
    }

    fn is_leader_unavailable(error: &Error) -> bool {
        matches!(error, Error::LeaderUnavailable(_))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes() {
    distributed_conformance::read_your_writes::<Bb8>(Mode::Time).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_in_causal_mode() {
    distributed_conformance::read_your_writes::<Bb8>(Mode::Causal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_to_caught_up_followers() {
    distributed_conformance::reads_return_to_caught_up_followers::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_checked_on_demand() {
    distributed_conformance::followers_are_checked_on_demand::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_job_payload_reads_the_write() {
    distributed_conformance::a_token_in_a_job_payload_reads_the_write::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_shorter_than_the_lag_reads_no_stale_row() {
    distributed_conformance::a_window_shorter_than_the_lag_reads_no_stale_row::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_to_followers_after_the_window() {
    distributed_conformance::reads_return_to_followers_after_the_window::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_a_read_handle_fails() {
    distributed_conformance::write_through_a_read_handle_fails::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_unreachable_servers() {
    distributed_conformance::starts_with_unreachable_servers::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_down_at_mark_time() {
    distributed_conformance::cache_down_at_mark_time::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_reads_lagging_and_crashes() {
    distributed_conformance::monotonic_reads_lagging_and_crashes::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_commit_positions() {
    distributed_conformance::reports_commit_positions::<Bb8>().await;
}
