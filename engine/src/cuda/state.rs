//! One GPU's training state: f32 master parameters, gradients and AdamW moments on the device,
//! the parameters' working copy in `T` (bf16 or f16; f32 reads the masters themselves), fp16's
//! loss scale, and the asynchronous copies of the state to the host for checkpoints. Its step is
//! the one step of both backends (`train::step`, with `GpuLayout` for the dp group).

use std::ops::Range;

use gantry_kernels::cuda::cudarc::cublaslt::{CudaBlasLT, Matmul};
use std::sync::Arc;

use gantry_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use gantry_kernels::cuda::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use gantry_kernels::cuda::ops::{self, Storage};
use gantry_kernels::cuda::Gpu;

use super::dp::{GpuDp, GpuLayout};
use crate::backend::Cuda;
use crate::checkpoint::LossScaleState;
use crate::models::{Activations, Model};
use crate::optim::AdamW;
use crate::params::ParamTable;
use crate::train::step::{self, State};
use crate::train::update::{LossScale, Outcome, Update};
use crate::{Error, Result};

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuStep {
    /// Mean loss per token over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping (of the unscaled gradients).
    pub grad_norm: f64,
    /// The update was skipped, parameters and moments left as they were: fp16's gradients
    /// overflowed at its loss scale, or (any precision) the gradient norm was not finite.
    pub skipped: bool,
    /// Of the skipped steps, those no loss scale can rescue: the gradients were not finite
    /// unscaled (fp32, bf16), or fp16's overflowed at the floor scale of 1 (which halving keeps
    /// at 1). The trainer stops a run after too many in a row (see
    /// `train::MAX_NONFINITE_STEPS_IN_A_ROW`); fp16's other overflows are how the scale settles.
    pub nonfinite: bool,
    /// fp16: the loss scale after the step (1 otherwise).
    pub loss_scale: f32,
}

/// The training state in page-locked host memory, filled by a copy stream while the compute
/// stream goes on (see [`GpuTrainer::begin_download`]).
pub struct HostState {
    params: PinnedHostSlice<f32>,
    m: PinnedHostSlice<f32>,
    v: PinnedHostSlice<f32>,
    /// Recorded on the copy stream after the copies into these buffers. The slices' own events
    /// are recorded only under cudarc's event tracking, which `Gpu::open` turns off, so their
    /// `as_slice` would not wait for the copy: this event is what `slices` and `drop` wait for.
    copied: Option<CudaEvent>,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState").field("len", &self.params.len()).finish()
    }
}

impl HostState {
    /// The parameters and both moments, once the copies into them have finished (this waits).
    pub fn slices(&self) -> Result<(&[f32], &[f32], &[f32])> {
        let err = dev("copying the training state to the host");
        if let Some(copied) = &self.copied {
            copied.synchronize().map_err(&err)?;
        }
        Ok((self.params.as_slice().map_err(&err)?, self.m.as_slice().map_err(&err)?, self.v.as_slice().map_err(&err)?))
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        // A copy may still be writing into the page-locked memory about to be freed (a download
        // dropped unread, as when the writer thread cannot be started).
        if let Some(copied) = &self.copied {
            let _ = copied.synchronize();
        }
    }
}

/// Where a GPU trainer starts from: the parameters and, for a resumed run, AdamW's moments and
/// (fp16) the loss scale. (Steps are numbered by the caller, see [`GpuTrainer::step`].)
#[derive(Clone, Copy, Debug)]
pub struct StartState<'a> {
    pub params: &'a [f32],
    pub moments: Option<(&'a [f32], &'a [f32])>,
    pub loss_scale: Option<LossScaleState>,
    /// Under ZeRO-1, the parts of the flat buffer this rank updates (its pieces of each chunk,
    /// see `parallel::DataParallel::pieces`); the moments hold those parts, concatenated.
    /// `None`: the whole table.
    pub pieces: Option<&'a [Range<usize>]>,
}

impl<'a> StartState<'a> {
    /// A run from `params`, with no optimizer state yet.
    pub fn fresh(params: &'a [f32]) -> Self {
        StartState { params, moments: None, loss_scale: None, pieces: None }
    }
}

pub struct GpuTrainer<T: Storage>
where
    CudaBlasLT: Matmul<T>,
{
    be: Cuda<T>,
    /// The one model, run on the CUDA backend.
    model: Model,
    table: ParamTable,
    master: CudaSlice<f32>,
    /// The working copy (`None` for f32, which reads the masters).
    work: Option<CudaSlice<T>>,
    grads: CudaSlice<f32>,
    /// The parts of the flat buffer this rank updates (`m` and `v` hold them concatenated).
    pieces: Vec<Range<usize>>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    acts: Activations<Cuda<T>>,
    optim: AdamW,
    scaler: Option<LossScale>,
    /// The stream that copies state to the host beside training, and the host buffers of the
    /// last copy, returned for reuse.
    copy_stream: Option<Arc<CudaStream>>,
    spare: Option<HostState>,
    /// Recorded on the copy stream after a download: the next optimizer update waits for it.
    copy_done: Option<CudaEvent>,
}

impl<T: Storage> std::fmt::Debug for GpuTrainer<T>
where
    CudaBlasLT: Matmul<T>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTrainer").field("precision", &T::SUFFIX).field("params", &self.master.len()).finish()
    }
}

fn dev(what: &str) -> impl Fn(gantry_kernels::cuda::cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

impl<T: Storage> GpuTrainer<T>
where
    CudaBlasLT: Matmul<T>,
{
    /// Uploads `params` (the model's flat buffer) and sizes activations for `batch` sequences of
    /// `seq` tokens.
    pub fn new(gpu: Gpu, model: &Model, params: &[f32], batch: usize, seq: usize, optim: AdamW) -> Result<Self> {
        Self::with_state(gpu, model, StartState::fresh(params), batch, seq, optim)
    }

    /// As `new`, from `start` (a resumed run's moments and loss scale).
    pub fn with_state(gpu: Gpu, model: &Model, start: StartState<'_>, batch: usize, seq: usize, optim: AdamW) -> Result<Self> {
        let StartState { params, moments, loss_scale, pieces } = start;
        let pieces = pieces.map_or_else(|| std::iter::once(0..params.len()).collect(), <[_]>::to_vec);
        let shard: usize = pieces.iter().map(|p| p.len()).sum();
        let outside = pieces.iter().any(|p| p.start > p.end || p.end > params.len());
        if params.len() != model.table.len() || outside || moments.is_some_and(|(m, v)| m.len() != shard || v.len() != shard) {
            return Err(Error::Unsupported {
                field: "model".into(),
                message: format!(
                    "{} parameters and {} optimizer-state elements for a table of {}",
                    params.len(),
                    moments.map_or(0, |(m, _)| m.len()),
                    model.table.len()
                ),
            });
        }
        let be = Cuda::<T>::new(gpu);
        let acts = model.activations_on(&be, batch, seq)?;
        let gpu = be.gpu();
        let s = gpu.stream().clone();
        let n = params.len();
        let master = s.clone_htod(params).map_err(dev("uploading parameters"))?;
        // By type, not by kernel suffix: `State::weights` reads the masters as `T` when there is
        // no working copy, which holds only for f32 itself.
        let work = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            None
        } else {
            let mut w = s.alloc_zeros::<T>(n).map_err(dev("allocating the working copy"))?;
            ops::cast_from_f32(gpu, &mut w, &master)?;
            Some(w)
        };
        let zeros = |n| s.alloc_zeros::<f32>(n).map_err(dev("allocating gradients and optimizer state"));
        let grads = zeros(n)?;
        let (m, v) = match moments {
            Some((m, v)) => {
                (s.clone_htod(m).map_err(dev("uploading optimizer state"))?, s.clone_htod(v).map_err(dev("uploading optimizer state"))?)
            }
            None => (zeros(shard)?, zeros(shard)?),
        };
        Ok(GpuTrainer {
            scaler: (T::SUFFIX == "f16").then(|| loss_scale.map_or_else(LossScale::new, LossScale::from_state)),
            be,
            model: model.clone(),
            table: model.table.clone(),
            master,
            work,
            grads,
            pieces,
            m,
            v,
            acts,
            optim,
            copy_stream: None,
            spare: None,
            copy_done: None,
        })
    }

    /// Bytes of parameters (both copies), gradients and optimizer state on the device.
    pub fn state_bytes(&self) -> u64 {
        let n = self.table.len() as u64;
        let work = if self.work.is_some() { 2 * n } else { 0 };
        8 * n + work + 4 * (self.m.len() + self.v.len()) as u64
    }

    /// Optimizer step number `step` (1-based, for AdamW's bias corrections) over `micro_batches`
    /// (each `[b, seq+1]` tokens) at learning rate `lr`, clipping the global gradient norm to
    /// `grad_clip` (0: off). The loss is averaged over every token of the step, as on CPU.
    ///
    /// With `dp`, this rank's micro-batches are its share of the global batch: every rank takes as
    /// many tokens, the gradients are summed across the group (see [`GpuDp`]) and the loss is the
    /// mean over the global batch.
    ///
    /// The caller numbers the steps, as the CPU trainer does, so a resumed run continues with the
    /// numbers the uninterrupted one would have used. A skipped step (an fp16 overflow, or
    /// gradients that are not finite) still uses up its number (PyTorch's `GradScaler` would not
    /// advance Adam's count there; numbering by step keeps resume exact instead).
    pub fn step(&mut self, micro_batches: &[&[u32]], lr: f32, grad_clip: f64, step: u32, dp: Option<GpuDp<'_>>) -> Result<GpuStep> {
        let w = self.acts.seq() + 1;
        let tokens: usize = micro_batches.iter().map(|mb| mb.len() / w * (w - 1)).sum();
        if tokens == 0 {
            return Err(Error::Unsupported { field: "batch".into(), message: "a step needs at least one window".into() });
        }
        let global_tokens = tokens * dp.as_ref().map_or(1, GpuDp::size);
        if dp.as_ref().is_none_or(|d| d.zero() == 0) && self.m.len() != self.master.len() {
            return Err(Error::Unsupported {
                field: "parallel.zero".into(),
                message: "this GPU trainer holds a ZeRO shard of the optimizer state: its steps need the dp group".into(),
            });
        }
        let loss_scale = self.scaler.map_or(1.0, |s| s.scale);
        // The one step of both backends (`train::step`), with this GPU's layout: its dp group,
        // and the state copy the update must wait for (see `begin_download`).
        let u = Update { optim: &self.optim, table: &self.table, pieces: &self.pieces, lr, step, max_norm: grad_clip };
        let mut layout = GpuLayout { dp, copy_done: &mut self.copy_done };
        let mut st = State {
            params: &mut self.master,
            work: self.work.as_mut(),
            grads: &mut self.grads,
            m: &mut self.m,
            v: &mut self.v,
            pieces: &self.pieces,
            len: self.table.len(),
        };
        let grad_scale = loss_scale / global_tokens as f32;
        let (total, outcome) =
            step::step(&self.be, &self.model, &mut layout, &mut st, &mut self.acts, micro_batches, grad_scale, &u, self.scaler.as_mut())?;
        let loss_scale = self.scaler.map_or(1.0, |s| s.scale);
        let Outcome { grad_norm, skipped, nonfinite } = outcome;
        Ok(GpuStep { loss: total / global_tokens as f64, grad_norm, skipped, nonfinite, loss_scale })
    }

    /// Mean loss per token over `windows`, forward only.
    pub fn loss(&mut self, windows: &[u32]) -> Result<f64> {
        let total = self.model.loss_on(&self.be, State::weights(&self.be, &self.master, self.work.as_ref())?, &mut self.acts, windows)?;
        Ok(total / (windows.len() / (self.acts.seq() + 1) * self.acts.seq()) as f64)
    }

    /// The f32 gradients of the last step (before clipping if none applied), on the host.
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        self.be.gpu().stream().clone_dtoh(&self.grads).map_err(dev("copying gradients to the host"))
    }

    /// Copies the masters and AdamW's moments into host buffers of the table's size.
    pub fn download_state(&self, params: &mut [f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        let s = self.be.gpu().stream();
        s.memcpy_dtoh(&self.master, params).map_err(dev("copying parameters to the host"))?;
        s.memcpy_dtoh(&self.m, m).map_err(dev("copying optimizer state to the host"))?;
        s.memcpy_dtoh(&self.v, v).map_err(dev("copying optimizer state to the host"))?;
        s.synchronize().map_err(dev("copying state to the host"))
    }

    /// Starts copying the masters and AdamW's moments to page-locked host memory on a stream of
    /// its own, and returns at once: the next step's forward and backward run while the copy
    /// does, and its optimizer update, which overwrites what is being copied, waits for the copy.
    /// [`HostState::slices`] waits for it.
    ///
    /// The ordering is explicit, with events: buffers are not event-tracked (see `Gpu::open`).
    pub fn begin_download(&mut self) -> Result<HostState> {
        let ctx = self.be.gpu().context().clone();
        let stream = match &self.copy_stream {
            Some(s) => s.clone(),
            None => {
                let s = ctx.new_stream().map_err(dev("creating the copy stream"))?;
                self.copy_stream = Some(s.clone());
                s
            }
        };
        let n = self.master.len();
        let mut hs = match self.spare.take() {
            Some(h) => h,
            None => {
                // Plain page-locked memory (flags 0): the checkpoint writer reads it, which
                // write-combined memory (cudarc's default) would make slow.
                let alloc = || {
                    // SAFETY: the memory is uninitialised until the copies below fill every
                    // element; `HostState::slices` waits for them before anything reads it.
                    unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }.map_err(dev("allocating page-locked host memory"))
                };
                HostState { params: alloc()?, m: alloc()?, v: alloc()?, copied: None }
            }
        };
        // A recycled buffer's event is that of its previous, finished copy: not this one's.
        hs.copied = None;
        let queued = (|| {
            // The copy starts after everything queued so far (the last update) ...
            let updated = self.be.gpu().stream().record_event(None).map_err(dev("recording an event"))?;
            stream.wait(&updated).map_err(dev("ordering the copy stream"))?;
            stream.memcpy_dtoh(&self.master, &mut hs.params).map_err(dev("copying parameters to the host"))?;
            stream.memcpy_dtoh(&self.m, &mut hs.m).map_err(dev("copying optimizer state to the host"))?;
            stream.memcpy_dtoh(&self.v, &mut hs.v).map_err(dev("copying optimizer state to the host"))?;
            // The reader of `hs` waits for the copy (a blocking wait: the writer thread sleeps) ...
            let copied = stream.record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC)).map_err(dev("recording an event"))?;
            hs.copied = Some(copied);
            // ... and the next update starts after it (see `GpuLayout::update`).
            self.copy_done = Some(stream.record_event(None).map_err(dev("recording an event"))?);
            Ok(())
        })();
        if let Err(e) = queued {
            // Copies queued before the failure may still be writing into the page-locked
            // buffers, which go when `hs` is dropped: wait for them first.
            let _ = stream.synchronize();
            return Err(e);
        }
        Ok(hs)
    }

    /// Hands back the host buffers of a finished download for the next one.
    pub fn recycle(&mut self, hs: HostState) {
        if hs.params.len() == self.master.len() {
            self.spare = Some(hs);
        }
    }

    /// The f32 master parameters, on the host (for checkpoints and export).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        self.be.gpu().stream().clone_dtoh(&self.master).map_err(dev("copying parameters to the host"))
    }

    /// Forward and backward over `windows` without an update, accumulating `grad_scale ×
    /// ∂loss/∂params` into the (zeroed) gradients: the summed loss. For comparisons with the CPU
    /// model's `forward_backward`.
    pub fn forward_backward(&mut self, windows: &[u32], grad_scale: f32) -> Result<f64> {
        ops::zero(self.be.gpu(), &mut self.grads)?;
        let mut p = State::weights(&self.be, &self.master, self.work.as_ref())?;
        self.model.forward_backward_on(&self.be, &mut p, &mut self.grads, &mut self.acts, windows, grad_scale)
    }
}

impl<T: Storage> Drop for GpuTrainer<T>
where
    CudaBlasLT: Matmul<T>,
{
    fn drop(&mut self) {
        // A copy to the host may still be reading the buffers about to be freed (buffers are not
        // event-tracked; see `Gpu::open`).
        if let Some(s) = &self.copy_stream {
            let _ = s.synchronize();
        }
    }
}

/// A GPU trainer of any precision, for callers that pick the precision at run time.
pub trait GpuStepper: Send {
    /// One optimizer step (see [`GpuTrainer::step`]).
    fn step(&mut self, micro_batches: &[&[u32]], lr: f32, grad_clip: f64, step: u32, dp: Option<GpuDp<'_>>) -> Result<GpuStep>;
    /// Copies parameters and moments to the host (see [`GpuTrainer::download_state`]).
    fn download_state(&self, params: &mut [f32], m: &mut [f32], v: &mut [f32]) -> Result<()>;
    /// Bytes of training state on the device.
    fn state_bytes(&self) -> u64;
    /// Waits for the device to finish the work queued so far.
    fn synchronize(&self) -> Result<()>;
    /// Starts an asynchronous copy of the state to the host (see [`GpuTrainer::begin_download`]).
    fn begin_download(&mut self) -> Result<HostState>;
    /// Returns a download's buffers for reuse.
    fn recycle(&mut self, hs: HostState);
    /// fp16: the loss scale now (for checkpoints).
    fn loss_scale(&self) -> Option<LossScaleState>;
}

impl<T: Storage> GpuStepper for GpuTrainer<T>
where
    CudaBlasLT: Matmul<T>,
{
    fn step(&mut self, micro_batches: &[&[u32]], lr: f32, grad_clip: f64, step: u32, dp: Option<GpuDp<'_>>) -> Result<GpuStep> {
        GpuTrainer::step(self, micro_batches, lr, grad_clip, step, dp)
    }

    fn download_state(&self, params: &mut [f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        GpuTrainer::download_state(self, params, m, v)
    }

    fn state_bytes(&self) -> u64 {
        GpuTrainer::state_bytes(self)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(self.be.gpu().synchronize()?)
    }

    fn begin_download(&mut self) -> Result<HostState> {
        GpuTrainer::begin_download(self)
    }

    fn recycle(&mut self, hs: HostState) {
        GpuTrainer::recycle(self, hs)
    }

    fn loss_scale(&self) -> Option<LossScaleState> {
        self.scaler.map(|s| s.state())
    }
}

/// A trainer in `precision` on `gpu` (see [`GpuTrainer::with_state`]).
pub fn gpu_trainer(
    precision: crate::config::Precision,
    gpu: Gpu,
    model: &Model,
    start: StartState<'_>,
    batch: usize,
    seq: usize,
    optim: AdamW,
) -> Result<Box<dyn GpuStepper>> {
    use crate::config::Precision;
    use gantry_kernels::cuda::half::{bf16, f16};
    Ok(match precision {
        Precision::Fp32 => Box::new(GpuTrainer::<f32>::with_state(gpu, model, start, batch, seq, optim)?),
        Precision::Bf16 => Box::new(GpuTrainer::<bf16>::with_state(gpu, model, start, batch, seq, optim)?),
        Precision::Fp16 => Box::new(GpuTrainer::<f16>::with_state(gpu, model, start, batch, seq, optim)?),
    })
}
