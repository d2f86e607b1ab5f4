//! Gantry's compute kernels.
//!
//! `cpu` holds the multithreaded (rayon) and SIMD-friendly kernels the engine runs on CPU, and
//! `cpu::reference` their scalar oracles: every optimised kernel is tested against the plain loop
//! that states what it computes. CUDA kernels (NVRTC-compiled `.cu` sources) join under `cuda/`
//! with the CUDA backend issue.

pub mod cpu;
