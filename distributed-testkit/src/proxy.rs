//! A TCP proxy that delays every byte by a fixed one-way latency: a far-away server on loopback.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::{RigError, url};

/// How many chunks may be in flight per direction before the reader waits for the writer.
const CHUNKS_IN_FLIGHT: usize = 1024;

/// Forwards connections on a loopback port to `upstream`, each direction delayed by
/// `one_way_delay` (so a round trip gains twice that). Dropping it closes the listener and every
/// forwarded connection.
///
/// Each chunk is stamped when read and written once its stamp plus the delay has passed, so order
/// is kept and throughput is not divided by the delay.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    one_way_delay: Duration,
    accept_loop: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free `127.0.0.1` port and starts forwarding.
    pub async fn start(upstream: SocketAddr, one_way_delay: Duration) -> Result<Self, RigError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| RigError::Net {
                action: "binding the delay proxy".to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| RigError::Net {
            action: "reading the delay proxy's address".to_owned(),
            source,
        })?;
        let accept_loop = tokio::spawn(accept(listener, upstream, one_way_delay));
        Ok(Self {
            addr,
            one_way_delay,
            accept_loop,
        })
    }

    /// A proxy in front of the server `url` names (`scheme://[user@]host:port/...`); connect with
    /// [`url_for`](Self::url_for) of the same URL.
    pub async fn in_front_of(url: &str, one_way_delay: Duration) -> Result<Self, RigError> {
        let host_port = url::host_port(url)?;
        let upstream = tokio::net::lookup_host(host_port)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| RigError::BadUrl {
                url: url.to_owned(),
            })?;
        Self::start(upstream, one_way_delay).await
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The delay added in each direction.
    pub fn one_way_delay(&self) -> Duration {
        self.one_way_delay
    }

    /// `url` (e.g. a `postgres://` or `redis://` URL) pointed at the proxy instead; user, path and
    /// query are kept.
    pub fn url_for(&self, url: &str) -> Result<String, RigError> {
        url::with_host_port(url, self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The connections live in the accept loop's JoinSet, which aborts them when dropped.
        self.accept_loop.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, delay: Duration) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Accept errors (e.g. out of file descriptors) pass; the next accept may succeed.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        connections.spawn(forward(client, upstream, delay));
        while connections.try_join_next().is_some() {}
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, delay: Duration) {
    // An unreachable upstream looks like a refused connection: the client sees it closed.
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Both directions in one task, so aborting the task ends both.
    tokio::join!(
        delayed_copy(client_read, server_write, delay),
        delayed_copy(server_read, client_write, delay),
    );
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; EOF is delayed too.
async fn delayed_copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay: Duration,
) {
    // `None` marks end of stream.
    let (chunks, mut pending) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let done = chunk.is_none();
            if chunks.send((Instant::now() + delay, chunk)).await.is_err() || done {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = pending.recv().await {
            tokio::time::sleep_until(due).await;
            let Some(chunk) = chunk else {
                break;
            };
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes every connection back to itself.
    async fn echo_server() -> Result<SocketAddr, std::io::Error> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(addr)
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn adds_the_delay_both_ways_and_keeps_order() -> Result<(), Box<dyn std::error::Error>> {
        let delay = Duration::from_millis(40);
        let proxy = DelayProxy::start(echo_server().await?, delay).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;

        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"ping").await?, b"ping");
        let elapsed = started.elapsed();
        assert!(elapsed >= 2 * delay, "round trip took {elapsed:?}");
        assert!(
            elapsed < 2 * delay + Duration::from_secs(1),
            "round trip took {elapsed:?}"
        );

        // Many small writes arrive in order.
        let message: Vec<u8> = (0..=255).collect();
        for byte in &message {
            stream.write_all(std::slice::from_ref(byte)).await?;
        }
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await?;
        assert_eq!(reply, message);
        Ok(())
    }

    #[tokio::test]
    async fn pipelined_chunks_are_not_serialised_by_the_delay()
    -> Result<(), Box<dyn std::error::Error>> {
        let delay = Duration::from_millis(100);
        let proxy = DelayProxy::start(echo_server().await?, delay).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        let started = std::time::Instant::now();
        for _ in 0..10 {
            stream.write_all(b"x").await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut reply = [0; 10];
        stream.read_exact(&mut reply).await?;
        // Ten chunks through a serialising proxy would take 10 x 200 ms.
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() -> Result<(), Box<dyn std::error::Error>> {
        let proxy = DelayProxy::start(echo_server().await?, Duration::from_millis(1)).await?;
        let addr = proxy.addr();
        let mut stream = TcpStream::connect(addr).await?;
        assert_eq!(round_trip(&mut stream, b"a").await?, b"a");
        drop(proxy);
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await?;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The listener is gone too; give the runtime a moment to close it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn url_for_points_at_the_proxy() -> Result<(), RigError> {
        let proxy =
            DelayProxy::start(SocketAddr::from(([127, 0, 0, 1], 1)), Duration::ZERO).await?;
        assert_eq!(
            proxy.url_for("postgres://postgres@127.0.0.1:5432/postgres")?,
            format!("postgres://postgres@{}/postgres", proxy.addr())
        );
        Ok(())
    }
}
