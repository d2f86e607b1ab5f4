//! Training on GPUs (feature `cuda`): a rank's state on its GPU (`state`: fp32 master weights and
//! optimizer state, the activations in the working precision: f32, bf16, or f16 with dynamic loss
//! scaling), and what data parallelism over NCCL adds to the one step (`dp`: overlapped
//! all-reduce, ZeRO-1).
//!
//! The model is the one model of `models/`, run on the CUDA backend (`backend::Cuda`): the same
//! layers over the same [`ParamTable`](crate::params::ParamTable), whose flat buffer is uploaded
//! whole, so a checkpoint, an export or a comparison with the CPU run is a copy. The GPU tests
//! (`engine/tests/cuda_model.rs`) check losses and gradients against the CPU backend.

mod bench;
mod dp;
mod state;

pub use crate::train::update::LossScale;
pub use bench::{bench_gpu, peak_flops};
pub use dp::{GpuDp, GpuLayout};
pub use state::{gpu_trainer, GpuStep, GpuStepper, GpuTrainer, HostState, StartState};
