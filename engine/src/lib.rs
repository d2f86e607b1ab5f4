//! Gantry's training engine.
//!
//! Models (`models/`) are built from Hugging Face configs and run explicit forward and backward
//! passes over layers in `nn/`, each written once over the operations of `backend/` (the CPU
//! kernels, or the CUDA ones); their parameters, gradients and optimizer state live in flat
//! buffers described by a [`params::ParamTable`] whose chunks are the unit later sharded by ZeRO
//! and moved by Gemini. `train/` holds the trainer, `data/` the token pipeline, `optim/` AdamW
//! and the learning-rate schedule, `checkpoint/` Hugging Face loading and export, `comm/` the
//! collectives between ranks (TCP), `parallel/` data parallelism and ZeRO over the chunks.

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
pub mod models;
pub mod nn;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod pipeline;
pub mod rng;
pub mod run_dir;
pub mod train;

pub use error::{Error, Result};
