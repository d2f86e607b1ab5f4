//! The trainer's GPU path: with `resources.devices = "cuda:N"` each rank's step runs on its GPU
//! (see `crate::cuda`; several GPUs form a dp group over NCCL or host memory, see
//! `crate::cuda::GpuDp`), and the host buffers are brought up to date only where the run needs
//! them (checkpoints, the final model). In builds without the `cuda` feature the type is empty, so the
//! trainer's GPU branches compile away.

#[cfg(feature = "cuda")]
mod imp {
    use crate::config::Precision;

    use std::time::Duration;

    use crate::checkpoint::LossScaleState;
    use crate::comm::{Comm, NcclComm};
    pub use crate::cuda::HostState;
    use crate::cuda::{gpu_trainer, GpuDp, GpuStep, GpuStepper, StartState};
    use crate::models::Model;
    use crate::optim::AdamW;
    use crate::parallel::DataParallel;
    use crate::params::ParamBuffers;
    use crate::Result;

    /// A job's GPU, opened when the trainer is built (so a missing driver or device fails the
    /// job before anything is written), and its training state, created at the first step from
    /// the host buffers (so a resumed run starts from the checkpoint it loaded).
    pub struct OnGpu {
        ordinal: usize,
        /// The device's name (for its peak FLOP/s).
        name: String,
        device: Option<gantry_kernels::cuda::Gpu>,
        stepper: Option<Box<dyn GpuStepper>>,
        /// Whether the host buffers hold the GPU's current state.
        host_current: bool,
        /// The dp group's NCCL communicator (`parallel.gpu_comm = "nccl"` on several ranks).
        nccl: Option<NcclComm>,
    }

    impl std::fmt::Debug for OnGpu {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OnGpu").field("ordinal", &self.ordinal).field("started", &self.stepper.is_some()).finish()
        }
    }

    impl OnGpu {
        pub fn open(ordinal: usize) -> Result<Self> {
            let device = gantry_kernels::cuda::Gpu::open(ordinal)
                .map_err(|e| crate::Error::Device(format!("resources.devices = \"cuda:{ordinal}\": {e}")))?;
            let name = device.context().name().unwrap_or_default();
            Ok(OnGpu { ordinal, name, device: Some(device), stepper: None, host_current: true, nccl: None })
        }

        /// The GPU's dense peak FLOP/s at `precision`, when it is one we know.
        pub fn peak_flops(&self, precision: Precision) -> Option<f64> {
            crate::cuda::peak_flops(&self.name, precision)
        }

        /// Joins the NCCL communicator of `tcp`'s world on this GPU (every rank calls it, before
        /// the first step).
        pub fn connect_nccl(&mut self, tcp: &mut Comm, timeout: Duration) -> Result<()> {
            let gpu = match &self.device {
                Some(g) => g,
                None => return Err(crate::Error::Device("NCCL must be joined before the first step".into())),
            };
            self.nccl = Some(NcclComm::connect(tcp, gpu, timeout)?);
            Ok(())
        }

        /// One optimizer step; the first one uploads `buffers` (parameters, and the moments
        /// after `steps` steps of a resumed run).
        #[allow(clippy::too_many_arguments)]
        pub fn step(
            &mut self,
            precision: Precision,
            model: &Model,
            buffers: &ParamBuffers,
            steps: u64,
            loss_scale: Option<LossScaleState>,
            (micro, seq): (usize, usize),
            optim: AdamW,
            micro_batches: &[&[u32]],
            lr: f32,
            clip: f64,
            dp: Option<&mut DataParallel>,
        ) -> Result<GpuStep> {
            if self.stepper.is_none() {
                let gpu = match self.device.take() {
                    Some(g) => g,
                    None => gantry_kernels::cuda::Gpu::open(self.ordinal)?,
                };
                // NCCL must queue its collectives on the stream the trainer computes on.
                if let Some(n) = &mut self.nccl {
                    n.set_stream(gpu.stream().clone());
                }
                let moments = (steps > 0).then_some((&buffers.m[..], &buffers.v[..]));
                self.stepper = Some(gpu_trainer(
                    precision,
                    gpu,
                    model,
                    StartState { params: &buffers.params, moments, loss_scale, pieces: Some(&buffers.pieces) },
                    micro,
                    seq,
                    optim,
                )?);
            }
            self.host_current = false;
            let dp = dp.map(|dp| GpuDp { dp, nccl: self.nccl.as_mut() });
            self.stepper.as_mut().expect("created above").step(micro_batches, lr, clip, steps as u32 + 1, dp)
        }

        /// Drops the training state: the next step uploads the host buffers again (after a
        /// resume loaded a checkpoint into them).
        pub fn reset(&mut self) {
            self.stepper = None;
            self.host_current = true;
        }

        /// Copies the GPU's parameters and moments into `buffers` unless they are current.
        pub fn sync_host(&mut self, buffers: &mut ParamBuffers) -> Result<()> {
            if let (false, Some(st)) = (self.host_current, &self.stepper) {
                let ParamBuffers { params, m, v, .. } = buffers;
                st.download_state(params, m, v)?;
                self.host_current = true;
            }
            Ok(())
        }

        pub fn state_bytes(&self) -> u64 {
            self.stepper.as_ref().map_or(0, |s| s.state_bytes())
        }

        /// Starts copying the state to the host beside training (`None` before the first step:
        /// the host buffers are current then).
        pub fn begin_download(&mut self) -> Result<Option<HostState>> {
            match (&mut self.stepper, self.host_current) {
                (Some(st), false) => Ok(Some(st.begin_download()?)),
                _ => Ok(None),
            }
        }

        pub fn recycle(&mut self, hs: HostState) {
            if let Some(st) = &mut self.stepper {
                st.recycle(hs);
            }
        }

        /// fp16: the loss scale now.
        pub fn loss_scale(&self) -> Option<LossScaleState> {
            self.stepper.as_ref().and_then(|s| s.loss_scale())
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use crate::params::ParamBuffers;
    use crate::Result;

    /// Without CUDA there is never a GPU state: the types have no values.
    #[derive(Debug)]
    pub enum OnGpu {}

    #[derive(Debug)]
    pub enum HostState {}

    impl HostState {
        pub fn slices(&self) -> Result<(&[f32], &[f32], &[f32])> {
            match *self {}
        }
    }

    impl OnGpu {
        pub fn connect_nccl(&mut self, _tcp: &mut crate::comm::Comm, _timeout: std::time::Duration) -> Result<()> {
            match *self {}
        }

        pub fn sync_host(&mut self, _buffers: &mut ParamBuffers) -> Result<()> {
            match *self {}
        }

        pub fn reset(&mut self) {
            match *self {}
        }

        pub fn begin_download(&mut self) -> Result<Option<HostState>> {
            match *self {}
        }

        pub fn recycle(&mut self, hs: HostState) {
            match hs {}
        }

        pub fn loss_scale(&self) -> Option<crate::checkpoint::LossScaleState> {
            match *self {}
        }

        pub fn peak_flops(&self, _precision: crate::config::Precision) -> Option<f64> {
            match *self {}
        }
    }
}

pub use imp::{HostState, OnGpu};
