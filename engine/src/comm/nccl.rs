//! The NCCL backend (feature `cuda`): the collectives of [`Comm`] on GPU buffers, with the same
//! names and semantics (in place, `shard_range` shards, the same all-to-all blocks), for ranks
//! that each own one GPU.
//!
//! Ranks meet through the TCP communicator: rank 0 draws NCCL's unique id and broadcasts it over
//! TCP, so NCCL needs no launcher or environment of its own. Uneven shards (a chunk whose length
//! the world does not divide) are reduce-scattered as one grouped `ncclReduce` per shard and
//! all-gathered as one grouped `ncclBroadcast` per shard, which NCCL runs as a single operation.
//!
//! Waits on the GPU are bounded like the TCP backend's: a collective that has not completed within
//! the timeout (a dead or stuck peer) aborts the communicator and returns an error instead of
//! hanging, and an asynchronous NCCL error (a peer's connection dropped) is reported as soon as it
//! is seen. `ncclCommInitRank` blocks inside NCCL until every rank has joined, so it runs on a
//! thread of its own and the caller waits for it at most the timeout: a rank that never joins
//! fails the others with an error (the stuck thread is left behind; the process is expected to
//! exit on the error). Still inside NCCL's own calls: the connection NCCL sets up on the first use
//! of a peer (a non-blocking communicator, `ncclCommInitRankConfig` with `blocking = 0`, would
//! bound that too, at the price of every call returning `ncclInProgress`).
//!
//! Sub-groups (the axes of a [`DeviceMesh`](super::DeviceMesh)) are communicators of their own,
//! split from the world's with `ncclCommSplit` (see [`NcclComm::split`]).
//!
//! Point to point follows NCCL's rules, not the TCP backend's: a `send` completes only once the
//! peer posts the matching `recv`, so two ranks that both send first wait for each other (until
//! the timeout); order them (even ranks send first) or use `all_to_all`.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_kernels::cuda::cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use gantry_kernels::cuda::cudarc::nccl::{result, sys};
use gantry_kernels::cuda::ops::{In, Out};
use gantry_kernels::cuda::Gpu;

use super::{shard_range, Comm, Group, ReduceOp};
use crate::{Error, Result};

/// One rank's NCCL communicator over the ranks of a TCP [`Comm`]'s world.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    aborted: bool,
    /// Between `defer` and `wait_deferred`: the stream the data is written on (collectives
    /// queued on `stream`, a side stream, each after what that stream has queued so far), and the
    /// collectives queued since, to wait for.
    deferred: Option<Deferred>,
    /// The side stream deferred collectives run on, made on first use.
    side: Option<Arc<CudaStream>>,
}

struct Deferred {
    compute: Arc<CudaStream>,
    queued: Vec<(String, CudaEvent)>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not race;
// every method takes `&mut self`, so they cannot.
unsafe impl Send for NcclComm {}

/// A communicator handle on its way from the init thread.
struct RawComm(sys::ncclComm_t);

// SAFETY: the handle is only moved to the thread that then owns it; nothing uses it in between.
unsafe impl Send for RawComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Comm { rank: None, message: format!("NCCL {what}: {e:?}") }
}

impl NcclComm {
    /// Joins the NCCL communicator of `tcp`'s world on `gpu`. Every rank calls it; rank 0's NCCL
    /// id reaches the others over TCP. Waits are bounded by `timeout`.
    pub fn connect(tcp: &mut Comm, gpu: &Gpu, timeout: Duration) -> Result<Self> {
        // SAFETY: is_culib_present only tries to dlopen libnccl under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device(
                "NCCL (libnccl.so.2) not found: install it (`pip install nvidia-nccl-cu13`) and put its folder on LD_LIBRARY_PATH".into(),
            ));
        }
        let (rank, world) = (tcp.rank(), tcp.world());
        let mut id = [0u8; 128];
        if rank == 0 {
            let uid = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            for (d, s) in id.iter_mut().zip(uid.internal.iter()) {
                *d = *s as u8;
            }
        }
        let g = tcp.world_group();
        tcp.broadcast(&g, &mut id, 0)?;
        let uid = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        let ctx = gpu.context().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                let r = ctx.bind_to_thread().map_err(|e| Error::Device(format!("binding the GPU: {e}"))).and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by ncclCommInitRank before it is read; world and
                    // rank are this job's, and every rank passes the same id.
                    unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32) }
                        .map_err(|e| nccl_err("ncclCommInitRank", e))?;
                    // SAFETY: initialised by the successful call above.
                    Ok(RawComm(unsafe { comm.assume_init() }))
                });
                let _ = tx.send(r);
            })
            .map_err(|e| Error::Device(format!("starting NCCL's init thread: {e}")))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(r) => r?.0,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(Error::Comm {
                    rank: None,
                    message: format!("NCCL init of {world} ranks did not complete within {timeout:?}: a rank is dead or stuck"),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Device("NCCL init: the init thread ended without an answer (it panicked)".into()))
            }
        };
        // NCCL's later calls on this thread find the GPU current.
        gpu.context().bind_to_thread().map_err(|e| Error::Device(format!("binding the GPU: {e}")))?;
        Ok(NcclComm { comm, stream: gpu.stream().clone(), rank, world, timeout, aborted: false, deferred: None, side: None })
    }

    /// The communicator of `group` (a set of this world's ranks, as `DeviceMesh::group` gives):
    /// every rank of the world calls it, each with its own group, and the groups must partition
    /// the world (as a mesh axis's groups do). Collective over the world, like NCCL's
    /// `ncclCommSplit`.
    pub fn split(&mut self, group: &Group) -> Result<NcclComm> {
        self.live()?;
        if group.ranks.get(group.me) != Some(&self.rank) {
            return Err(Error::Comm {
                rank: None,
                message: format!("split: rank {} is not at position {} of the group {:?}", self.rank, group.me, group.ranks),
            });
        }
        // The group's first rank names it: groups that partition the world differ in it.
        let color = *group.ranks.iter().min().expect("a group holds this rank") as i32;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `self.comm` is live; `comm` is written before it is read; a null config makes
        // the new communicator inherit this one's.
        let r = unsafe { sys::ncclCommSplit(self.comm, color, group.me as i32, comm.as_mut_ptr(), std::ptr::null_mut()) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(nccl_err("ncclCommSplit", r));
        }
        // SAFETY: initialised by the successful call above.
        let comm = unsafe { comm.assume_init() };
        Ok(NcclComm {
            comm,
            stream: self.stream.clone(),
            rank: group.me,
            world: group.size(),
            timeout: self.timeout,
            aborted: false,
            deferred: None,
            side: None,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Queues later collectives on `stream`: the stream the buffers they read are written on (a
    /// trainer rebuilt on a reopened GPU computes on a new one).
    pub fn set_stream(&mut self, stream: Arc<CudaStream>) {
        self.stream = stream;
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn live(&self) -> Result<()> {
        if self.aborted {
            return Err(Error::Comm { rank: None, message: "the NCCL communicator was aborted after an earlier failure".into() });
        }
        Ok(())
    }

    /// Runs `launch` (which queues NCCL calls on the stream) and waits for the stream, polling
    /// NCCL's asynchronous error; aborts the communicator past the timeout. Deferred (see
    /// `defer`), the collective is queued after the compute stream's work and not waited for.
    fn run(&mut self, what: &str, launch: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        self.live()?;
        let dev = |e: gantry_kernels::cuda::cudarc::driver::DriverError| Error::Device(format!("{what}: ordering the streams: {e}"));
        if let Some(d) = &self.deferred {
            let written = d.compute.record_event(None).map_err(dev)?;
            self.stream.wait(&written).map_err(dev)?;
        }
        if let Err(e) = launch(self) {
            // SAFETY: a communicator whose enqueue failed is not used again.
            unsafe { sys::ncclCommAbort(self.comm) };
            self.aborted = true;
            return Err(e);
        }
        let event = self.stream.record_event(None).map_err(|e| Error::Device(format!("recording an event: {e}")))?;
        if let Some(d) = &mut self.deferred {
            d.queued.push((what.to_string(), event));
            return Ok(());
        }
        self.wait_for(what, &event)
    }

    /// Polls `event` (the end of a collective) until it completes, NCCL reports an error, or the
    /// timeout passes (then the communicator is aborted).
    fn wait_for(&mut self, what: &str, event: &CudaEvent) -> Result<()> {
        // An aborted communicator is freed: nothing may ask NCCL about it again (and its
        // collectives were ended by the abort).
        self.live()?;
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Error::Device(format!("{what}: {e}"))),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `self.comm` is a live communicator and `async_err` is valid for writes.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            let failed = !matches!(async_err, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress);
            if failed || start.elapsed() > self.timeout {
                // SAFETY: abort is the documented way out of a communicator stuck on a dead peer.
                unsafe { sys::ncclCommAbort(self.comm) };
                self.aborted = true;
                let why = if failed {
                    format!("NCCL reported {async_err:?}")
                } else {
                    format!("not complete after {:?}: a peer is dead or stuck", self.timeout)
                };
                return Err(Error::Comm { rank: None, message: format!("{what}: {why}; communicator aborted") });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// From now until `wait_deferred`, collectives are queued on a side stream of their own, each
    /// after the work `compute` has queued when it is called, and return at once: a trainer
    /// hands over each chunk of gradients as backward finishes it and goes on computing. The
    /// buffers handed over must not be written until `wait_deferred` returns.
    pub fn defer(&mut self, compute: &Arc<CudaStream>) -> Result<()> {
        self.live()?;
        if self.deferred.is_some() {
            return Err(Error::Comm { rank: None, message: "collectives are already being deferred".into() });
        }
        let side = match &self.side {
            Some(s) if Arc::ptr_eq(s.context(), compute.context()) => s.clone(),
            _ => compute.fork().map_err(|e| Error::Device(format!("creating the communication stream: {e}")))?,
        };
        self.side = Some(side.clone());
        self.stream = side;
        self.deferred = Some(Deferred { compute: compute.clone(), queued: Vec::new() });
        Ok(())
    }

    /// Waits for every collective queued since `defer` (bounded by the timeout as ever), and
    /// queues later ones on the compute stream again, waiting for each. Returns how many there
    /// were.
    pub fn wait_deferred(&mut self) -> Result<usize> {
        let Some(d) = self.deferred.take() else { return Ok(0) };
        self.stream = d.compute.clone();
        let n = d.queued.len();
        for (what, event) in &d.queued {
            self.wait_for(what, event)?;
        }
        Ok(n)
    }

    fn group<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let r = f();
        let end = result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        let r = r?;
        end?;
        Ok(r)
    }

    /// In place: every rank's `data` becomes the element-wise sum (or mean) over ranks.
    pub fn all_reduce(&mut self, data: &mut impl Out<f32>, op: ReduceOp) -> Result<()> {
        let mut v = data.view_mut();
        let n = v.len();
        let nop = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        };
        self.run("all_reduce", |s| {
            let (p, _sync) = v.device_ptr_mut(&s.stream);
            // SAFETY: in place on n floats of this rank's buffer, on the communicator's stream.
            unsafe {
                result::all_reduce(p as *const _, p as *mut _, n, sys::ncclDataType_t::ncclFloat32, nop, s.comm, s.stream.cu_stream() as _)
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclAllReduce", e))
        })
    }

    /// In place: this rank's shard (`shard_range(len, world, rank)`, returned) of `data` becomes
    /// the sum over ranks; the rest of `data` is left as scratch.
    pub fn reduce_scatter(&mut self, data: &mut impl Out<f32>) -> Result<Range<usize>> {
        let len = data.view_mut().len();
        self.reduce_scatter_chunks(data, std::slice::from_ref(&(0..len)))?;
        Ok(shard_range(len, self.world, self.rank))
    }

    /// In place: every rank's `data` becomes the concatenation of each rank's own shard.
    pub fn all_gather(&mut self, data: &mut impl Out<f32>) -> Result<()> {
        let len = data.view_mut().len();
        self.all_gather_chunks(data, std::slice::from_ref(&(0..len)))
    }

    /// `reduce_scatter` on each of `chunks` (ranges of `data`) at once, as one NCCL group: the
    /// data-parallel trainer's gradients, sharded chunk by chunk as ZeRO shards them.
    pub fn reduce_scatter_chunks(&mut self, data: &mut impl Out<f32>, chunks: &[Range<usize>]) -> Result<()> {
        self.per_shard("reduce_scatter", data, chunks, |s, at, n, root| {
            // SAFETY: in place on one shard of this rank's buffer; its owner `root` keeps the sum.
            unsafe {
                result::reduce(
                    at as *const _,
                    at as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    root,
                    s.comm,
                    s.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclReduce", e))
        })
    }

    /// `all_gather` on each of `chunks` (ranges of `data`) at once, as one NCCL group.
    pub fn all_gather_chunks(&mut self, data: &mut impl Out<f32>, chunks: &[Range<usize>]) -> Result<()> {
        self.per_shard("all_gather", data, chunks, |s, at, n, root| {
            // SAFETY: in place on one shard of this rank's buffer; its owner `root` sends it.
            unsafe {
                result::broadcast(
                    at as *const _,
                    at as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    root,
                    s.comm,
                    s.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclBroadcast", e))
        })
    }

    /// Runs `op(self, address, length, owner)` on every `shard_range` shard of each chunk of
    /// `data` as one NCCL group (shards may be uneven, which NCCL's own reduce-scatter and
    /// all-gather do not allow).
    fn per_shard(
        &mut self,
        what: &str,
        data: &mut impl Out<f32>,
        chunks: &[Range<usize>],
        op: impl Fn(&Self, u64, usize, i32) -> Result<()>,
    ) -> Result<()> {
        let mut v = data.view_mut();
        let (len, world) = (v.len(), self.world);
        if let Some(c) = chunks.iter().find(|c| c.start > c.end || c.end > len) {
            return Err(Error::Comm { rank: None, message: format!("{what}: chunk {c:?} lies outside the {len} elements given") });
        }
        self.run(what, |s| {
            let (p, _sync) = v.device_ptr_mut(&s.stream);
            Self::group(|| {
                for c in chunks {
                    for i in 0..world {
                        let r = shard_range(c.len(), world, i);
                        if r.is_empty() {
                            continue;
                        }
                        op(s, p + ((c.start + r.start) * 4) as u64, r.len(), i as i32)?;
                    }
                }
                Ok(())
            })
        })
    }

    /// Copies `root`'s `data` to every rank.
    pub fn broadcast(&mut self, data: &mut impl Out<u8>, root: usize) -> Result<()> {
        let mut v = data.view_mut();
        let n = v.len();
        self.run("broadcast", |s| {
            let (p, _sync) = v.device_ptr_mut(&s.stream);
            // SAFETY: in place on n bytes of this rank's buffer.
            unsafe {
                result::broadcast(
                    p as *const _,
                    p as *mut _,
                    n,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    s.comm,
                    s.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("ncclBroadcast", e))
        })
    }

    /// Point to point: sends `data` to rank `to`.
    pub fn send(&mut self, to: usize, data: &impl In<u8>) -> Result<()> {
        let v = data.view();
        let n = v.len();
        self.run("send", |s| {
            let (p, _sync) = v.device_ptr(&s.stream);
            // SAFETY: n bytes of this rank's buffer.
            unsafe { result::send(p as *const _, n, sys::ncclDataType_t::ncclUint8, to as i32, s.comm, s.stream.cu_stream() as _) }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclSend", e))
        })
    }

    /// Point to point: receives exactly `data.len()` bytes from rank `from`.
    pub fn recv(&mut self, from: usize, data: &mut impl Out<u8>) -> Result<()> {
        let mut v = data.view_mut();
        let n = v.len();
        self.run("recv", |s| {
            let (p, _sync) = v.device_ptr_mut(&s.stream);
            // SAFETY: n bytes of this rank's buffer.
            unsafe { result::recv(p as *mut _, n, sys::ncclDataType_t::ncclUint8, from as i32, s.comm, s.stream.cu_stream() as _) }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclRecv", e))
        })
    }

    /// All-to-all: block j of `send` goes to rank j; block i of `recv` comes from rank i. Both
    /// hold `world` equal blocks.
    pub fn all_to_all(&mut self, send: &impl In<f32>, recv: &mut impl Out<f32>) -> Result<()> {
        let (sv, mut rv) = (send.view(), recv.view_mut());
        let world = self.world;
        if sv.len() != rv.len() || !sv.len().is_multiple_of(world) {
            return Err(Error::Comm {
                rank: None,
                message: format!("all_to_all: {} and {} elements do not split into {world} blocks", sv.len(), rv.len()),
            });
        }
        let b = sv.len() / world;
        self.run("all_to_all", |s| {
            let (sp, _s1) = sv.device_ptr(&s.stream);
            let (rp, _s2) = rv.device_ptr_mut(&s.stream);
            Self::group(|| {
                for j in 0..world {
                    let off = (j * b * 4) as u64;
                    // SAFETY: block j of each buffer, b floats.
                    unsafe {
                        result::send(
                            (sp + off) as *const _,
                            b,
                            sys::ncclDataType_t::ncclFloat32,
                            j as i32,
                            s.comm,
                            s.stream.cu_stream() as _,
                        )
                        .map_err(|e| nccl_err("ncclSend", e))?;
                        result::recv(
                            (rp + off) as *mut _,
                            b,
                            sys::ncclDataType_t::ncclFloat32,
                            j as i32,
                            s.comm,
                            s.stream.cu_stream() as _,
                        )
                        .map_err(|e| nccl_err("ncclRecv", e))?;
                    }
                }
                Ok(())
            })
        })
    }

    /// Returns once every rank has called it (an all-reduce of one float).
    pub fn barrier(&mut self) -> Result<()> {
        let mut one = self.stream.alloc_zeros::<f32>(1).map_err(|e| Error::Device(format!("barrier: {e}")))?;
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: the communicator is live and used by nothing else once we are dropped.
            unsafe { sys::ncclCommDestroy(self.comm) };
        }
    }
}
