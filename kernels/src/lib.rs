//! Gantry's compute kernels.
//!
//! `cpu` holds the multithreaded (rayon) and SIMD-friendly kernels the engine runs on CPU, and
//! `cpu::reference` their scalar oracles: every optimised kernel is tested against the plain loop
//! that states what it computes. `cuda` holds the CUDA backend: `.cu` sources (in `kernels/cuda/`)
//! compiled at run time by NVRTC and cached per source hash and GPU architecture, cuBLASLt
//! matmuls, and the host-side launchers. Its types exist in every build; without the `cuda`
//! feature they return [`Error::NotBuilt`].

pub mod cpu;
pub mod cuda;
mod error;

pub use error::{Error, Result};
