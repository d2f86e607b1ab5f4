//! The worker's line to its daemon: registration, heartbeats, step reports and checkpoint records
//! over gRPC, from a thread of its own so that training never waits on the network.
//!
//! Reports queue in memory and are sent in order; a report is dropped from the queue only once the
//! daemon acknowledged it (which it does only after storing it). So a daemon restart or a database
//! outage delays reports but loses none, and since the store keys them by step, a report sent twice
//! is stored once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gantry_api::proto::worker_service_client::WorkerServiceClient;
use gantry_api::proto::{self, WorkerId};
use gantry_api::StepMetrics;
use tonic::transport::Channel;

enum Report {
    Step(StepMetrics),
    Checkpoint { step: i64, path: String },
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Report>,
    /// Set when the training loop has nothing more to send.
    closed: bool,
}

/// Handle held by the training loop.
pub struct Reporter {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    /// The daemon asked this worker to stop (job cancelled or superseded).
    pub stop: Arc<AtomicBool>,
    step: Arc<AtomicI64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Adds the job attempt's secret to every call.
#[derive(Clone)]
pub struct WithSecret(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for WithSecret {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, WithSecret>>;

/// A lazy channel to the daemon: `unix:///path/worker.sock` (the daemon's data directory), or
/// `http://host:port`.
pub fn channel(daemon: &str) -> anyhow::Result<Channel> {
    let timeouts = |e: tonic::transport::Endpoint| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(10));
    match daemon.strip_prefix("unix://") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            // The URI is not used: every connection goes to the socket.
            let endpoint = timeouts(tonic::transport::Endpoint::from_static("http://worker.sock"));
            Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            })))
        }
        None => {
            Ok(timeouts(Channel::from_shared(daemon.to_string()).with_context(|| format!("daemon address `{daemon}`"))?).connect_lazy())
        }
    }
}

/// A client of the daemon's worker service whose calls carry `secret`.
pub fn client(daemon: &str, secret: &str) -> anyhow::Result<Client> {
    let value = format!("Bearer {secret}").parse().map_err(|_| anyhow::anyhow!("the worker secret is not ASCII"))?;
    Ok(WorkerServiceClient::with_interceptor(channel(daemon)?, WithSecret(value)))
}

impl Reporter {
    /// Connects and registers, retrying for up to `register_timeout` (the daemon may be
    /// restarting), then starts the sending thread with its heartbeat.
    pub fn start(daemon: &str, secret: &str, id: WorkerId, world_size: u32, register_timeout: Duration) -> anyhow::Result<Reporter> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // The lazy channel spawns its connection task on the runtime it is created in.
        let mut client = {
            let _in_runtime = rt.enter();
            client(daemon, secret)?
        };
        let started = Instant::now();
        let deadline = started + register_timeout;
        let req = proto::RegisterRequest { worker: Some(id), pid: std::process::id(), world_size };
        loop {
            match rt.block_on(client.register(req)) {
                Ok(_) => break,
                Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::Unauthenticated) => {
                    bail!("the daemon refused this worker: {}", s.message())
                }
                Err(s) if Instant::now() < deadline => {
                    // The daemon answers "not yet" while it starts the job's other ranks: said
                    // only if it goes on.
                    if started.elapsed() > Duration::from_secs(10) {
                        tracing::warn!("registering with {daemon}: {}; retrying", s.message());
                    } else {
                        tracing::debug!("registering with {daemon}: {}; retrying", s.message());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(s) => bail!("could not register with the daemon at {daemon} within {register_timeout:?}: {}", s.message()),
            }
        }
        let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let step = Arc::new(AtomicI64::new(0));
        let thread = {
            let (queue, stop, step) = (queue.clone(), stop.clone(), step.clone());
            std::thread::Builder::new().name("reporter".into()).spawn(move || rt.block_on(send_loop(client, id, queue, stop, step)))?
        };
        Ok(Reporter { queue, stop, step, thread: Some(thread) })
    }

    pub fn step(&self, m: StepMetrics) {
        self.step.store(m.step, Ordering::Relaxed);
        self.push(Report::Step(m));
    }

    pub fn checkpoint(&self, step: i64, path: String) {
        self.push(Report::Checkpoint { step, path });
    }

    fn push(&self, r: Report) {
        let (lock, cv) = &*self.queue;
        lock.lock().expect("reporter queue").items.push_back(r);
        cv.notify_all();
    }

    /// Waits until every report is acknowledged, or `timeout` passes; says whether all were.
    pub fn finish(mut self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().expect("reporter queue");
        q.closed = true;
        cv.notify_all();
        let deadline = Instant::now() + timeout;
        // (A worker the daemon told to stop waits no longer: its reports are not wanted.)
        while !q.items.is_empty() && Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) {
            q = cv.wait_timeout(q, Duration::from_millis(200)).expect("reporter queue").0;
        }
        let done = q.items.is_empty();
        drop(q);
        if done {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        done
    }
}

async fn send_loop(mut client: Client, id: WorkerId, queue: Arc<(Mutex<Queue>, Condvar)>, stop: Arc<AtomicBool>, step: Arc<AtomicI64>) {
    let mut last_beat = Instant::now() - Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    loop {
        if last_beat.elapsed() >= Duration::from_secs(1) {
            last_beat = Instant::now();
            match client.heartbeat(proto::HeartbeatRequest { worker: Some(id), step: step.load(Ordering::Relaxed) }).await {
                Ok(r) if r.get_ref().stop => stop.store(true, Ordering::Relaxed),
                Ok(_) => {}
                // The daemon does not know this worker's secret (its data directory's key was
                // replaced): nothing it sends will be taken.
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    tracing::error!("the daemon refuses this worker's secret: {}; stopping", s.message());
                    stop.store(true, Ordering::Relaxed);
                }
                Err(s) => tracing::warn!("heartbeat: {}", s.message()),
            }
        }
        // Take up to 64 queued reports of one kind, in order, without removing them yet.
        let (batch, checkpoint, closed) = {
            let (lock, cv) = &*queue;
            let mut q = lock.lock().expect("reporter queue");
            if q.items.is_empty() && !q.closed {
                q = cv.wait_timeout(q, Duration::from_millis(500)).expect("reporter queue").0;
            }
            let steps: Vec<StepMetrics> = q
                .items
                .iter()
                .take(64)
                .map_while(|r| match r {
                    Report::Step(m) => Some(m.clone()),
                    Report::Checkpoint { .. } => None,
                })
                .collect();
            let ck = match q.items.front() {
                Some(Report::Checkpoint { step, path }) if steps.is_empty() => Some((*step, path.clone())),
                _ => None,
            };
            (steps, ck, q.closed && q.items.is_empty())
        };
        if closed {
            return;
        }
        let sent = if !batch.is_empty() {
            let steps = batch.iter().map(proto::StepMetrics::from).collect();
            client.report_steps(proto::ReportStepsRequest { worker: Some(id), steps }).await.map(|_| batch.len())
        } else if let Some((step, path)) = checkpoint {
            client.checkpoint_committed(proto::CheckpointRequest { worker: Some(id), step, path }).await.map(|_| 1)
        } else {
            Ok(0)
        };
        match sent {
            Ok(n) => {
                backoff = Duration::from_millis(100);
                if n > 0 {
                    let (lock, cv) = &*queue;
                    lock.lock().expect("reporter queue").items.drain(..n);
                    cv.notify_all();
                }
            }
            Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) => {
                // The daemon will never take these: retrying would hold every later report back.
                // metrics.jsonl keeps the steps, and the daemon reads it when the job ends.
                let n = if batch.is_empty() { 1 } else { batch.len() };
                tracing::warn!("the daemon refused {n} report(s): {}; dropped (metrics.jsonl keeps them)", s.message());
                let (lock, cv) = &*queue;
                lock.lock().expect("reporter queue").items.drain(..n);
                cv.notify_all();
            }
            Err(s) => {
                tracing::warn!("reporting to the daemon: {} ({}); will retry", s.message(), s.code());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
