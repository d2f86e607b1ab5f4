//! `gantry daemon`: wires the store, supervisor, REST, gRPC and metrics together and runs them
//! until SIGTERM or Ctrl-C. Shutting down stops the APIs and the supervisor but leaves running
//! workers alone: the next daemon re-adopts them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::auth::worker::WorkerKeys;
use crate::auth::{Auth, Tokens};
use crate::cli::DaemonArgs;
use crate::config::DaemonConfig;
use crate::datadir::DataDir;
use crate::grpc::{Grpc, JobServiceServer, WorkerServiceServer};
use crate::http::{self, AppState};
use crate::listen::{self, tls, Limits, Listener, Protocol};
use crate::metrics::Metrics;
use crate::service::JobService;
use crate::store::Store;
use crate::supervisor::{lease, Supervisor};

pub fn run(a: DaemonArgs) -> anyhow::Result<()> {
    let config = DaemonConfig::resolve(&a)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(config))
}

async fn serve(mut config: DaemonConfig) -> anyhow::Result<()> {
    // One daemon per data directory (checked first: it needs nothing but the directory).
    let data_dir = DataDir::lock(&config.data_dir, &format!("http://{}", config.http))?;
    let store =
        Store::connect(&config.database_url).await.with_context(|| format!("opening the store at {}", redact(&config.database_url)))?;
    // One daemon per database: refuse to start beside another (before binding any port).
    let me = lease::this_process(&format!("http://{}", config.http));
    lease::acquire(&store, &me).await.context("taking the database's lease")?;
    let held = Arc::new(lease::Lease::new(me));
    let started = async {
        (config.runs_root, config.database_id) = data_dir.bind(&store).await.context("binding the data directory to the database")?;
        start(Arc::new(config), store.clone(), held.clone()).await
    }
    .await;
    if started.is_err() {
        // (A daemon that stopped for having lost the lease has nothing to give up.)
        if held.lost().is_none() {
            let _ = store.release_lease(&held.holder).await;
        }
    }
    store.close().await;
    drop(data_dir);
    started
}

/// Runs the daemon on `store`, whose lease it holds, until SIGTERM or Ctrl-C.
async fn start(config: Arc<DaemonConfig>, store: Store, held: Arc<lease::Lease>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let exe = std::env::current_exe().context("locating the gantry binary for the workers")?;
    let auth = Arc::new(match &config.tokens {
        Some(path) => Auth::Tokens(Tokens::load(path)?),
        None => Auth::Open,
    });
    let keys = Arc::new(WorkerKeys::open(&config.data_dir, &config.database_id)?);
    let supervisor = Supervisor::new(store.clone(), config.clone(), metrics.clone(), exe, held.clone(), keys.clone());
    let service = JobService::new(store.clone(), supervisor.clone(), config.clone());
    let state = AppState { service: service.clone(), metrics: metrics.clone(), auth: auth.clone() };
    let (stop_tx, stop_rx) = watch::channel(false);

    let (rest_tls, grpc_tls) = match &config.tls {
        Some((cert, key)) => (Some(tls::acceptor(cert, key, &[b"http/1.1"])?), Some(tls::acceptor(cert, key, &[b"h2"])?)),
        None => (None, None),
    };
    let http_listener =
        tokio::net::TcpListener::bind(config.http).await.with_context(|| format!("binding the REST address {}", config.http))?;
    let grpc_listener =
        tokio::net::TcpListener::bind(config.grpc).await.with_context(|| format!("binding the gRPC address {}", config.grpc))?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?),
        None => None,
    };
    let worker_listener = bind_worker_socket(&config.worker_socket())?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    eprintln!(
        "gantry daemon: REST on {scheme}://{}, gRPC on {}{}, store {} ({:?}), data in {}, runs in {}, devices {}, {}",
        http_listener.local_addr()?,
        grpc_listener.local_addr()?,
        if config.tls.is_some() { " (TLS)" } else { "" },
        redact(&config.database_url),
        store.backend(),
        config.data_dir.display(),
        config.runs_root.display(),
        config.slots.join(","),
        match auth.as_ref() {
            Auth::Open => "no tokens (every caller acts as an admin)".to_string(),
            Auth::Tokens(t) => format!("{} tokens", t.len()),
        }
    );
    if config.read_roots.is_confined() {
        let roots: Vec<String> = config.read_roots.dirs().iter().map(|d| d.display().to_string()).collect();
        eprintln!("gantry daemon: jobs read their files from {} only", roots.join(", "));
    }

    let limits = Limits {
        max_connections: config.max_connections,
        first_byte: config.read_timeout.min(Duration::from_secs(10)),
        header_read: config.read_timeout,
        ..Limits::default()
    };
    let drain = Duration::from_secs(5);
    let rest = http::router(state.clone(), metrics_listener.is_none());
    let http_task =
        tokio::spawn(listen::serve(Listener::Tcp(http_listener), rest, Protocol::Http1, rest_tls, limits, stop_rx.clone(), drain));
    let metrics_task = metrics_listener.map(|l| {
        let router = http::metrics_router(state.clone());
        tokio::spawn(listen::serve(Listener::Tcp(l), router, Protocol::Http1, None, limits, stop_rx.clone(), drain))
    });
    let grpc = Grpc { service, metrics: metrics.clone(), auth: auth.clone(), keys };
    let jobs = crate::grpc::Gate {
        inner: tonic::service::Routes::new(JobServiceServer::new(grpc.clone()).max_decoding_message_size(crate::grpc::JOB_MESSAGE_LIMIT)),
        auth,
        metrics,
        limit: (config.read_timeout * 2).max(Duration::from_secs(60)),
    };
    let grpc_task =
        tokio::spawn(listen::serve(Listener::Tcp(grpc_listener), jobs, Protocol::Http2, grpc_tls, limits, stop_rx.clone(), drain));
    let workers = tonic::service::Routes::new(WorkerServiceServer::new(grpc).max_decoding_message_size(crate::grpc::WORKER_MESSAGE_LIMIT));
    let worker_task = tokio::spawn(listen::serve(
        Listener::Unix(worker_listener, config.worker_socket()),
        workers,
        Protocol::Http2,
        None,
        limits,
        stop_rx.clone(),
        drain,
    ));
    let keeper = {
        let (held, store, stop) = (held.clone(), store.clone(), stop_rx.clone());
        tokio::spawn(async move { held.keep(store, stop).await })
    };
    let mut supervisor_task = tokio::spawn(supervisor.run(stop_rx));

    // Until SIGTERM or Ctrl-C, or until the supervisor stops by itself (another daemon took the
    // database's lease).
    let supervisor_ended = tokio::select! {
        _ = shutdown_signal() => None,
        ended = &mut supervisor_task => Some(ended),
    };
    eprintln!("gantry daemon: shutting down (running jobs keep training and are re-adopted on the next start)");
    let _ = stop_tx.send(true);
    let supervised = match supervisor_ended {
        Some(ended) => ended,
        None => supervisor_task.await,
    };
    // Open streams (a `gantry logs -f`, say) would hold a graceful shutdown open for as long as
    // they last: the listeners give their connections a few seconds to finish, no more.
    let _ = http_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = grpc_task.await;
    let _ = worker_task.await;
    let _ = keeper.await;
    match supervised {
        Ok(r) => r.context("supervising jobs"),
        Err(e) => anyhow::bail!("the supervisor task failed: {e}"),
    }
}

/// The workers' socket: a stale one (left by a daemon that was killed) is replaced; its directory
/// (the data directory, which only the daemon's user should be able to enter) guards who may
/// connect, and each call carries its job attempt's secret besides.
fn bind_worker_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    // A Unix socket's path has room for 107 bytes.
    if path.as_os_str().len() > 100 {
        anyhow::bail!(
            "the data directory's path is too long for the workers' socket {} ({} bytes; a socket path has at most 100 here): \
             choose a shorter --data-dir",
            path.display(),
            path.as_os_str().len()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale socket {}", path.display())),
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding the workers' socket {}", path.display()))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
