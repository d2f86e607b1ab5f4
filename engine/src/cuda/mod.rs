//! Training on GPUs (feature `cuda`): the GPT-2 and LLaMA forward and backward passes on the
//! CUDA kernels, and a trainer with fp32 master weights and optimizer state and the activations
//! in the working precision (f32, bf16, or f16 with dynamic loss scaling); one GPU per rank, with
//! data parallelism and ZeRO-1 across the ranks of a dp group (see `dp`).
//!
//! The model reads the same [`ParamTable`](crate::params::ParamTable) as the CPU model: the flat
//! buffer is uploaded whole, so a checkpoint, an export or a comparison with the CPU run is a copy.
//! The layer sequence mirrors `models::gpt2` and `models::llama` step for step; the GPU tests
//! (`engine/tests/cuda_model.rs`) check losses and gradients against the CPU model.

mod acts;
mod bench;
mod dp;
mod model;
mod trainer;

pub use acts::GpuActs;
pub use bench::{bench_gpu, peak_flops};
pub use dp::GpuDp;
pub use model::GpuModel;
pub use trainer::{gpu_trainer, GpuStep, GpuStepper, GpuTrainer, HostState, LossScale, StartState};
