//! The daemon's listeners: one accept loop serves REST (HTTP/1.1), gRPC (HTTP/2) and the workers'
//! Unix socket, with what a service exposed to a network needs and `axum::serve` or tonic's own
//! server do not all give: TLS, a bound on open connections, a deadline for a connection's first
//! bytes (its TLS handshake, its first request), a header read timeout, HTTP/2 keep-alive pings,
//! an idle timeout, and a lingering close, so that a client still sending a body the daemon
//! refused (413) reads the answer instead of a connection reset.

mod io;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

pub use io::Tracked;

/// The protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// REST: HTTP/1.1 (keep-alive), with a header read timeout.
    Http1,
    /// gRPC: HTTP/2 only, with keep-alive pings.
    Http2,
}

/// Bounds on connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// From accept to the first byte of a request (a TLS handshake included).
    pub first_byte: Duration,
    /// For the headers of each HTTP/1.1 request, and for the next one on an idle keep-alive
    /// connection.
    pub header_read: Duration,
    /// A connection on which nothing moves either way for this long is closed (an SSE stream
    /// sends a keep-alive comment every 15 s; an HTTP/2 peer answers pings).
    pub idle: Duration,
    /// HTTP/2 keep-alive: a ping after this much silence, and the connection closed if it is not
    /// answered within `ping_timeout` (a peer that vanished without closing).
    pub ping_every: Duration,
    pub ping_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            first_byte: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            ping_every: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(20),
        }
    }
}

/// Where a listener accepts.
pub enum Listener {
    Tcp(TcpListener),
    /// The workers' socket; removed when the listener ends.
    Unix(UnixListener, PathBuf),
}

/// Serves `service` on `listener` until `shutdown` turns true, then lets open connections finish
/// for up to `drain` (new requests on them are refused) and returns.
pub async fn serve<S, B>(
    listener: Listener,
    service: S,
    protocol: Protocol,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (service, tls, watcher) = (service.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            let activity = io.activity();
            match tls {
                Some(acceptor) => match tokio::time::timeout(limits.first_byte, acceptor.accept(io)).await {
                    Ok(Ok(stream)) => connection(stream, activity, service, protocol, limits, watcher).await,
                    Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                    Err(_) => tracing::debug!("TLS handshake: no handshake within {:?}", limits.first_byte),
                },
                None => connection(io, activity, service, protocol, limits, watcher).await,
            }
        });
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

async fn accept(listener: &Listener) -> std::io::Result<Tracked<Box<dyn Stream>>> {
    match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            // A peer whose machine vanished is noticed by the kernel's keep-alive probes.
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
            let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive);
            Ok(Tracked::new(Box::new(s)))
        }
        Listener::Unix(l, _) => Ok(Tracked::new(Box::new(l.accept().await?.0))),
    }
}

/// A byte stream a connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Serves one connection until it ends, goes idle past the limits, or the daemon shuts down.
async fn connection<I, S, B>(
    io: I,
    activity: io::Activity,
    service: S,
    protocol: Protocol,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(io);
    let service = TowerToHyperService::new(service);
    let served: std::pin::Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> = match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .keep_alive(true)
                .serve_connection(io, service);
            Box::pin(watcher.watch(conn))
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(limits.ping_every))
                .keep_alive_timeout(limits.ping_timeout)
                .max_concurrent_streams(32)
                .serve_connection(io, service);
            Box::pin(watcher.watch(conn))
        }
    };
    tokio::select! {
        r = served => if let Err(e) = r {
            tracing::debug!("connection: {e}");
        },
        _ = activity.stalled(limits.first_byte, limits.idle) => tracing::debug!("closing a connection: nothing moved on it"),
    }
}
