//! The demo's web app: users sign up, post, read their posts back, browse everyone's, log out.
//! Plain axum handlers: none of them names a scope, a session id or a server. The layers and
//! the pool do the routing.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as Web};
use distributed_core::Router;
use distributed_sqlx::{DistributedPool, ReadConnection, sqlx};
use serde::{Deserialize, Serialize};
use tower_sessions::Session;

use crate::stats::ServerStats;

/// The tables the demo uses, created on the leader at start.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS demo_users (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS demo_posts (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL,
    body text NOT NULL
);
CREATE INDEX IF NOT EXISTS demo_posts_by_user ON demo_posts (user_id, id);
";

const USER_ID: &str = "user_id";

pub(crate) struct AppState<R> {
    pub(crate) pool: DistributedPool<R>,
    /// A plain pool on the first follower, bypassing the router: what a naive router would read.
    pub(crate) naive: sqlx::PgPool,
    pub(crate) stats: Arc<ServerStats>,
}

/// What a read endpoint answers: the rows, and where they were read.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Read<T> {
    pub(crate) rows: T,
    pub(crate) target: String,
    pub(crate) reason: String,
}

pub(crate) fn app<R: Router + 'static>(state: Arc<AppState<R>>) -> Web {
    Web::new()
        .route("/signup", post(signup::<R>))
        .route("/me", get(me::<R>))
        .route("/posts", post(create_post::<R>))
        .route("/my-posts", get(my_posts::<R>))
        .route("/my-posts/naive", get(my_posts_naive::<R>))
        .route("/feed", get(feed::<R>))
        .route("/logout", post(logout))
        .with_state(state)
}

/// A handler failure: logged without details a user could have put there, answered with 500.
pub(crate) struct AppError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for AppError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        eprintln!("demo app: request failed: {:#}", self.0);
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

type Handled<T> = Result<T, AppError>;

async fn current_user(session: &Session) -> Handled<Option<i64>> {
    Ok(session.get::<i64>(USER_ID).await?)
}

impl<R: Router + 'static> AppState<R> {
    /// A routed read connection, counted by where it went and why.
    async fn read(&self) -> Handled<ReadConnection> {
        let conn = self.pool.read().await?;
        self.stats.count(conn.decision());
        Ok(conn)
    }
}

fn answer<T>(rows: T, conn: &ReadConnection) -> Json<Read<T>> {
    let decision = conn.decision();
    Json(Read {
        rows,
        target: decision.target.kind().to_owned(),
        reason: decision.reason.label().to_owned(),
    })
}

/// The visitor's very first request: it writes before it has a session id.
async fn signup<R: Router + 'static>(
    State(app): State<Arc<AppState<R>>>,
    session: Session,
) -> Handled<Json<i64>> {
    let id: i64 = app
        .pool
        .write(|mut conn| async move {
            sqlx::query_scalar("INSERT INTO demo_users (name) VALUES ('someone') RETURNING id")
                .fetch_one(&mut *conn)
                .await
        })
        .await?;
    session.insert(USER_ID, id).await?;
    Ok(Json(id))
}

/// The next request: is the new user there?
async fn me<R: Router + 'static>(
    State(app): State<Arc<AppState<R>>>,
    session: Session,
) -> Handled<Response> {
    let Some(user) = current_user(&session).await? else {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    };
    let mut conn = app.read().await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT id FROM demo_users WHERE id = $1")
        .bind(user)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(answer(found.is_some(), &conn).into_response())
}

async fn create_post<R: Router + 'static>(
    State(app): State<Arc<AppState<R>>>,
    session: Session,
) -> Handled<Response> {
    let Some(user) = current_user(&session).await? else {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    };
    let id: i64 = app
        .pool
        .write(|mut conn| async move {
            sqlx::query_scalar(
                "INSERT INTO demo_posts (user_id, body) VALUES ($1, 'hello') RETURNING id",
            )
            .bind(user)
            .fetch_one(&mut *conn)
            .await
        })
        .await?;
    Ok(Json(id).into_response())
}

const MY_POSTS: &str = "SELECT id FROM demo_posts WHERE user_id = $1 ORDER BY id DESC LIMIT 50";

async fn my_posts<R: Router + 'static>(
    State(app): State<Arc<AppState<R>>>,
    session: Session,
) -> Handled<Response> {
    let Some(user) = current_user(&session).await? else {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    };
    let mut conn = app.read().await?;
    let ids: Vec<i64> = sqlx::query_scalar(MY_POSTS)
        .bind(user)
        .fetch_all(&mut *conn)
        .await?;
    Ok(answer(ids, &conn).into_response())
}

/// The control: the same read from a follower, as a router without pins would do it.
async fn my_posts_naive<R: Router + 'static>(
    State(app): State<Arc<AppState<R>>>,
    session: Session,
) -> Handled<Response> {
    let Some(user) = current_user(&session).await? else {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    };
    let ids: Vec<i64> = sqlx::query_scalar(MY_POSTS)
        .bind(user)
        .fetch_all(&app.naive)
        .await?;
    Ok(Json(Read {
        rows: ids,
        target: "follower".to_owned(),
        reason: "naive".to_owned(),
    })
    .into_response())
}

/// Everyone's latest posts: what most requests are, and what followers are for.
async fn feed<R: Router + 'static>(State(app): State<Arc<AppState<R>>>) -> Handled<Response> {
    let mut conn = app.read().await?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM demo_posts ORDER BY id DESC LIMIT 20")
        .fetch_all(&mut *conn)
        .await?;
    Ok(answer(ids.len(), &conn).into_response())
}

async fn logout(session: Session) -> Handled<StatusCode> {
    session.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}
