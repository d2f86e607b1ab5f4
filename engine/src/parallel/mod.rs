//! Parallelism applied from outside the models. A model computes gradients of the data it was
//! given into its rank's flat buffer; the wrappers here make the ranks agree: data parallelism
//! sums gradients across the dp group, ZeRO-1 splits the optimizer state (and the update) across
//! it and gathers the updated parameters back.

mod dp;

pub use dp::DataParallel;
