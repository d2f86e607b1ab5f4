//! `gantry daemon`: wires the store, supervisor, REST, gRPC and metrics together and runs them
//! until SIGTERM or Ctrl-C. Shutting down stops the APIs and the supervisor but leaves running
//! workers alone: the next daemon re-adopts them.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::cli::DaemonArgs;
use crate::config::DaemonConfig;
use crate::grpc::{Grpc, JobServiceServer, WorkerServiceServer};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::service::JobService;
use crate::store::Store;
use crate::supervisor::{lease, Supervisor};

pub fn run(a: DaemonArgs) -> anyhow::Result<()> {
    let config = Arc::new(DaemonConfig::resolve(&a)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(config))
}

async fn serve(config: Arc<DaemonConfig>) -> anyhow::Result<()> {
    let store =
        Store::connect(&config.database_url).await.with_context(|| format!("opening the store at {}", redact(&config.database_url)))?;
    // One daemon per database: refuse to start beside another (before binding any port).
    let me = lease::this_process(&format!("http://{}", config.http));
    lease::acquire(&store, &me).await.context("taking the database's lease")?;
    let held = Arc::new(lease::Lease::new(me));
    let started = start(config, store.clone(), held.clone()).await;
    if started.is_err() {
        // (A daemon that stopped for having lost the lease has nothing to give up.)
        if held.lost().is_none() {
            let _ = store.release_lease(&held.holder).await;
        }
    }
    store.close().await;
    started
}

/// Runs the daemon on `store`, whose lease it holds, until SIGTERM or Ctrl-C.
async fn start(config: Arc<DaemonConfig>, store: Store, held: Arc<lease::Lease>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let exe = std::env::current_exe().context("locating the gantry binary for the workers")?;
    let supervisor = Supervisor::new(store.clone(), config.clone(), metrics.clone(), exe, held.clone());
    let service = JobService { store: store.clone(), supervisor: supervisor.clone(), config: config.clone() };
    let state = AppState { service: service.clone(), metrics: metrics.clone() };
    let (stop_tx, stop_rx) = watch::channel(false);

    let http_listener =
        tokio::net::TcpListener::bind(config.http).await.with_context(|| format!("binding the REST address {}", config.http))?;
    let grpc_listener =
        tokio::net::TcpListener::bind(config.grpc).await.with_context(|| format!("binding the gRPC address {}", config.grpc))?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?),
        None => None,
    };
    eprintln!(
        "gantry daemon: REST on http://{}, gRPC on {}, store {} ({:?}), data in {}, devices {}",
        http_listener.local_addr()?,
        grpc_listener.local_addr()?,
        redact(&config.database_url),
        store.backend(),
        config.data_dir.display(),
        config.slots.join(",")
    );

    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_task = tokio::spawn(
        axum::serve(http_listener, http::router(state.clone(), metrics_listener.is_none()))
            .with_graceful_shutdown(until_stopped(stop_rx.clone()))
            .into_future(),
    );
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(
            axum::serve(l, http::metrics_router(state.clone())).with_graceful_shutdown(until_stopped(stop_rx.clone())).into_future(),
        )
    });
    let grpc = Grpc { service, metrics };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobServiceServer::new(grpc.clone()))
            .add_service(WorkerServiceServer::new(grpc))
            .serve_with_incoming_shutdown(incoming, until_stopped(stop_rx.clone())),
    );
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
    // they last: the listeners get a few seconds to finish their requests, no more.
    let drain = Duration::from_secs(5);
    let _ = tokio::time::timeout(drain, http_task).await;
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(drain, t).await;
    }
    let _ = tokio::time::timeout(drain, grpc_task).await;
    let _ = keeper.await;
    match supervised {
        Ok(r) => r.context("supervising jobs"),
        Err(e) => anyhow::bail!("the supervisor task failed: {e}"),
    }
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
