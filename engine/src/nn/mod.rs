//! Layers with explicit forward and backward passes.
//!
//! A layer holds where its parameters are ([`ParamRef`]s into the flat buffers) and its sizes; its
//! `forward` writes outputs (and whatever its backward needs) into buffers the model owns, and its
//! `backward` accumulates parameter gradients (`+=`) and produces the input gradient. Layers run on
//! either backend (`crate::backend`); the parameter-free operations (attention, activations,
//! rotary embedding) are called on the backend straight from the models.
//!
//! [`ParamRef`]: crate::params::ParamRef

mod head;
mod linear;
mod norm;

pub use head::LmHead;
pub use linear::{Linear, WeightLayout};
pub use norm::{LayerNorm, RmsNorm};
