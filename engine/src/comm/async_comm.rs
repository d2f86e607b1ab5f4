//! Asynchronous collectives: a thread owns the [`Comm`] and runs submitted operations in order
//! while the caller computes. Operations own their buffers (moved in, handed back on completion),
//! so overlapping communication with compute needs no shared mutable memory.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Comm;
use crate::{Error, Result};

type Job = Box<dyn FnOnce(&mut Comm) + Send>;

/// After a failed operation every later one fails at once with its cause: the [`Comm`] keeps
/// that state itself.
pub struct AsyncComm {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<Comm>>,
    rank: usize,
    world: usize,
}

/// A submitted operation; `wait` returns its result and how long the thread spent on it.
pub struct Pending<T> {
    rx: mpsc::Receiver<(Result<T>, Duration)>,
}

impl<T> Pending<T> {
    /// The result if the operation has finished, else the handle back.
    pub fn try_wait(self) -> std::result::Result<Result<(T, Duration)>, Pending<T>> {
        match self.rx.try_recv() {
            Ok((r, busy)) => Ok(r.map(|v| (v, busy))),
            Err(mpsc::TryRecvError::Empty) => Err(self),
            Err(mpsc::TryRecvError::Disconnected) => Ok(Err(Error::Comm { rank: None, message: "the communication thread ended".into() })),
        }
    }

    pub fn wait(self) -> Result<(T, Duration)> {
        match self.rx.recv() {
            Ok((r, busy)) => r.map(|v| (v, busy)),
            Err(_) => Err(Error::Comm { rank: None, message: "the communication thread ended".into() }),
        }
    }
}

impl AsyncComm {
    pub fn new(comm: Comm) -> Result<AsyncComm> {
        let (rank, world) = (comm.rank(), comm.world());
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("comm".into())
            .spawn(move || {
                let mut comm = comm;
                for job in rx {
                    job(&mut comm);
                }
                comm
            })
            .map_err(|e| Error::Comm { rank: None, message: format!("starting the communication thread: {e}") })?;
        Ok(AsyncComm { tx: Some(tx), thread: Some(thread), rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Queues `f` behind the operations already submitted.
    pub fn submit<T: Send + 'static>(&self, f: impl FnOnce(&mut Comm) -> Result<T> + Send + 'static) -> Pending<T> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let start = Instant::now();
            let r = f(c);
            let _ = tx.send((r, start.elapsed()));
        });
        if let Some(q) = &self.tx {
            let _ = q.send(job);
        }
        Pending { rx }
    }

    /// Runs `f` and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Comm) -> Result<T> + Send + 'static) -> Result<T> {
        self.submit(f).wait().map(|(v, _)| v)
    }

    /// Stops the thread and hands the endpoint back.
    pub fn into_inner(mut self) -> Option<Comm> {
        self.tx.take();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for AsyncComm {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
