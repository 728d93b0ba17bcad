//! The workspace's routing conformance suite, against `distributed-sqlx` and real servers
//! (`cargo xtask integration-test`; skipped without a rig).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use distributed_conformance::{Adapter, Mode, Observed, Settings, TestRouter};
use distributed_core::{Config, Decision, FollowerSet, NodeProbe};
use distributed_sqlx::sqlx::{self, AssertSqlSafe};
use distributed_sqlx::{DistributedPool, Error};

struct Sqlx(DistributedPool<Arc<TestRouter>>);

fn insert(table: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!("insert into {table} (id) values ($1)"))
}

fn select(table: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!("select id from {table} where id = $1"))
}

#[async_trait]
impl Adapter for Sqlx {
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
            .map(Sqlx)
    }

    fn followers(&self) -> &FollowerSet {
        self.0.followers()
    }

    fn probe(&self) -> Arc<dyn NodeProbe> {
        self.0.probe()
    }

    async fn create_table(&self, table: &str) -> Result<(), Error> {
        let ddl = format!("create table {table} (id bigint primary key)");
        sqlx::query(AssertSqlSafe(ddl))
            .execute(self.0.leader())
            .await?;
        Ok(())
    }

    async fn write(&self, table: &str, id: i64) -> Result<(), Error> {
        self.0.execute(sqlx::query(insert(table)).bind(id)).await?;
        Ok(())
    }

    async fn write_in_transaction(&self, table: &str, id: i64) -> Result<(), Error> {
        let mut tx = self.0.begin().await?;
        sqlx::query(insert(table))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    async fn read(&self, table: &str, id: i64) -> Result<Observed, Error> {
        let mut conn = self.0.read().await?;
        let value = sqlx::query_scalar(select(table))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(Observed {
            value,
            decision: conn.decision(),
        })
    }

    async fn read_leader(&self, table: &str, id: i64) -> Result<Observed, Error> {
        let mut conn = self.0.read_leader().await?;
        let value = sqlx::query_scalar(select(table))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(Observed {
            value,
            decision: conn.decision(),
        })
    }

    async fn read_with_failover(&self, table: &str, id: i64) -> Result<Observed, Error> {
        self.0
            .read_with(|mut conn| {
                let sql = select(table);
                async move {
                    let value = sqlx::query_scalar(sql)
                        .bind(id)
                        .fetch_optional(&mut *conn)
                        .await?;
                    Ok(Observed {
                        value,
                        decision: conn.decision(),
                    })
                }
            })
            .await
    }

    async fn write_through_read_handle(
        &self,
        table: &str,
        id: i64,
        leader: bool,
    ) -> Result<Decision, Error> {
        let mut conn = if leader {
            self.0.read_leader().await?
        } else {
            self.0.read().await?
        };
        sqlx::query(insert(table))
            .bind(id)
            .execute(&mut *conn)
            .await?;
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
    distributed_conformance::read_your_writes::<Sqlx>(Mode::Time).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_in_causal_mode() {
    distributed_conformance::read_your_writes::<Sqlx>(Mode::Causal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_to_caught_up_followers() {
    distributed_conformance::reads_return_to_caught_up_followers::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_checked_on_demand() {
    distributed_conformance::followers_are_checked_on_demand::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_job_payload_reads_the_write() {
    distributed_conformance::a_token_in_a_job_payload_reads_the_write::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_shorter_than_the_lag_reads_no_stale_row() {
    distributed_conformance::a_window_shorter_than_the_lag_reads_no_stale_row::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_to_followers_after_the_window() {
    distributed_conformance::reads_return_to_followers_after_the_window::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_a_read_handle_fails() {
    distributed_conformance::write_through_a_read_handle_fails::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_unreachable_servers() {
    distributed_conformance::starts_with_unreachable_servers::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_down_at_mark_time() {
    distributed_conformance::cache_down_at_mark_time::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_reads_lagging_and_crashes() {
    distributed_conformance::monotonic_reads_lagging_and_crashes::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_commit_positions() {
    distributed_conformance::reports_commit_positions::<Sqlx>().await;
}
