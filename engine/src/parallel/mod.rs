//! Parallelism applied from outside the models. A model computes gradients of the data it was
//! given into its rank's flat buffer and announces, through hooks, which parameters it is about
//! to read and which gradients are final; the wrappers here act on those announcements: data
//! parallelism sums gradient chunks across the dp group while backward goes on, ZeRO shards the
//! optimizer state (1), the gradients (2) and the parameters (3) by chunk. Tensor parallelism
//! cuts the model itself (`models::TpRank` says which part a rank holds); its collectives inside
//! the layers run over the tp group here (`tensor.rs`). Sequence parallelism gives each rank a
//! part of every sequence; the all-to-alls around attention run here too (`sequence.rs`). The
//! 2D layout's grid layer (SUMMA) is in `summa.rs`.

mod dp;
mod final_grads;
pub mod pages;
mod sequence;
pub mod summa;
mod tensor;

pub use dp::DataParallel;
pub use final_grads::FinalGrads;
pub use sequence::SequenceParallel;
pub use tensor::TensorParallel;
