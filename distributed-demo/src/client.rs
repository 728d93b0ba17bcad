//! The scripted client: sessions that sign up, post, read their posts back at once, browse
//! everyone's, and log out — over real HTTP, each on its own keep-alive connection, keeping
//! its cookie like a browser.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use http::header::{CONTENT_LENGTH, COOKIE, HOST, SET_COOKIE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::app::Read;
use crate::stats::ClientStats;

/// One visitor's browser: a connection and a cookie jar of one cookie.
struct Browser {
    sender: SendRequest<Full<Bytes>>,
    cookie: Option<String>,
    stats: Arc<ClientStats>,
}

impl Browser {
    async fn open(addr: SocketAddr, stats: Arc<ClientStats>) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .context("connecting to the app")?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _closed = connection.await;
        });
        Ok(Self {
            sender,
            cookie: None,
            stats,
        })
    }

    /// Sends a request; returns the status and body, keeping any cookie the app sets.
    async fn send(&mut self, method: Method, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        ClientStats::add(&self.stats.requests);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "demo")
            .header(CONTENT_LENGTH, 0);
        if let Some(cookie) = &self.cookie {
            request = request.header(COOKIE, cookie);
        }
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.body(Full::new(Bytes::new()))?)
            .await?;
        if let Some(set) = response.headers().get(SET_COOKIE) {
            let pair = set.to_str()?.split(';').next().unwrap_or_default();
            self.cookie = Some(pair.to_owned());
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status.is_server_error() {
            ClientStats::add(&self.stats.errors);
        }
        Ok((status, body))
    }

    async fn json<T: DeserializeOwned>(&mut self, method: Method, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.send(method, path).await?;
        if !status.is_success() {
            bail!("{path}: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// What a session does until `deadline`.
pub(crate) async fn session(
    addr: SocketAddr,
    deadline: Instant,
    post_share: f64,
    stats: Arc<ClientStats>,
) -> anyhow::Result<()> {
    let mut browser = Browser::open(addr, stats.clone()).await?;

    // The first request writes before there is a session; the next must see the write.
    let _user: i64 = browser.json(Method::POST, "/signup").await?;
    let me: Read<bool> = browser.json(Method::GET, "/me").await?;
    ClientStats::add(&stats.own_checks);
    if !me.rows {
        ClientStats::add(&stats.own_stale);
    }

    while Instant::now() < deadline {
        let post = rand::rng().random_bool(post_share);
        if post {
            let id: i64 = browser.json(Method::POST, "/posts").await?;
            let mine: Read<Vec<i64>> = browser.json(Method::GET, "/my-posts").await?;
            ClientStats::add(&stats.own_checks);
            if !mine.rows.contains(&id) {
                ClientStats::add(&stats.own_stale);
            }
            let naive: Read<Vec<i64>> = browser.json(Method::GET, "/my-posts/naive").await?;
            ClientStats::add(&stats.naive_checks);
            if !naive.rows.contains(&id) {
                ClientStats::add(&stats.naive_stale);
            }
        } else {
            let _feed: Read<usize> = browser.json(Method::GET, "/feed").await?;
        }
        let pause = rand::rng().random_range(100..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }

    // Log out, then replay the old cookie as an attacker who kept it would.
    let old_cookie = browser.cookie.clone();
    let (status, _) = browser.send(Method::POST, "/logout").await?;
    if !status.is_success() {
        bail!("/logout: {status}");
    }
    browser.cookie = old_cookie;
    let (status, _) = browser.send(Method::GET, "/me").await?;
    ClientStats::add(&stats.replays);
    if status != StatusCode::UNAUTHORIZED {
        ClientStats::add(&stats.replays_logged_in);
    }
    Ok(())
}
