//! Layers with explicit forward and backward passes.
//!
//! A layer holds where its parameters are ([`ParamRef`]s into the flat buffers) and its sizes; its
//! `forward` writes outputs (and whatever its backward needs) into buffers the model owns, and its
//! `backward` accumulates parameter gradients (`+=`) and produces the input gradient. The
//! parameter-free operations (attention, activations, rotary embedding) are called straight from
//! the kernels crate.
//!
//! [`ParamRef`]: crate::params::ParamRef

mod head;
mod linear;
mod norm;

pub use head::LmHead;
pub use linear::{Linear, WeightLayout};
pub use norm::{LayerNorm, RmsNorm};

/// Two disjoint parameter slices of one buffer, mutably (for layers that update two parameters
/// at once, such as token and position embeddings).
pub fn two_mut(buf: &mut [f32], a: crate::params::ParamRef, b: crate::params::ParamRef) -> (&mut [f32], &mut [f32]) {
    assert!(a.offset + a.len <= b.offset || b.offset + b.len <= a.offset, "parameters overlap");
    if a.offset < b.offset {
        let (lo, hi) = buf.split_at_mut(b.offset);
        (&mut lo[a.offset..a.offset + a.len], &mut hi[..b.len])
    } else {
        let (lo, hi) = buf.split_at_mut(a.offset);
        (&mut hi[..a.len], &mut lo[b.offset..b.offset + b.len])
    }
}
