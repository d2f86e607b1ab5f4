//! The update after backward, the same on both backends: fp16's loss-scale check, one clipping,
//! one skip of a step whose gradients are not finite, and one AdamW over the pieces this rank
//! owns, each running where the buffers live (`crate::backend`). The CPU trainer (every ZeRO
//! stage) and the GPU trainer both end their steps here; what brings every rank the parameters
//! it needs afterwards (a ZeRO gather) stays with the data-parallel wrapper.

use std::ops::Range;

use crate::backend::Backend;
use crate::checkpoint::LossScaleState;
use crate::optim::{clip_on, AdamW, Grads};
use crate::params::ParamTable;
use crate::Result;

/// fp16's dynamic loss scale, as PyTorch's `GradScaler`: the loss gradient is multiplied by
/// `scale`; a step whose gradients overflow is skipped and the scale halved; after `interval`
/// good steps in a row it doubles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    pub scale: f32,
    pub interval: u32,
    good: u32,
}

impl LossScale {
    pub fn new() -> Self {
        LossScale { scale: 65536.0, interval: 2000, good: 0 }
    }

    /// Records a step's outcome; returns whether the step may be applied.
    pub fn update(&mut self, overflowed: bool) -> bool {
        if overflowed {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good = 0;
            return false;
        }
        self.good += 1;
        if self.good >= self.interval {
            self.scale = (self.scale * 2.0).min(f32::MAX / 2.0);
            self.good = 0;
        }
        true
    }

    /// What a checkpoint records.
    pub fn state(&self) -> LossScaleState {
        LossScaleState { scale: self.scale, good_steps: self.good }
    }

    /// The scale a checkpoint recorded.
    pub fn from_state(s: LossScaleState) -> Self {
        LossScale { scale: s.scale, good: s.good_steps, ..LossScale::new() }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

/// What the update is asked to do: the optimizer, the step, and the parts of the flat buffer
/// this rank updates (all of it, or its ZeRO pieces).
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    pub optim: &'a AdamW,
    pub table: &'a ParamTable,
    pub pieces: &'a [Range<usize>],
    pub lr: f32,
    /// 1-based, for AdamW's bias corrections.
    pub step: u32,
    /// Clip the global gradient norm to this (0: off).
    pub max_norm: f64,
}

/// Where this rank's summed gradients are.
pub enum Summed<'a, B: Backend> {
    /// In the flat buffer's layout; `norm` are the ranges this rank's norm covers (the whole
    /// buffer when every rank holds the same sums, its pieces when the group adds the squares).
    Full { grads: &'a mut B::F32, norm: &'a [Range<usize>] },
    /// This rank's pieces only, concatenated like the moments (ZeRO-2 and 3); `norm` are the
    /// ranges of them this rank's norm covers (all of them, unless a tp group shares the count).
    Pieces { grads: &'a mut B::F32, norm: &'a [Range<usize>] },
}

/// What became of the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// The global gradient norm before clipping (of the unscaled gradients); infinite for an
    /// fp16 overflow.
    pub grad_norm: f64,
    /// The update was skipped: the gradients were not finite (or fp16's overflowed at its scale).
    pub skipped: bool,
    /// Of the skipped steps, those no loss scale can rescue (see `train::nonfinite`).
    pub nonfinite: bool,
}

/// Unscales fp16's gradients (`scaler`), clips, and applies AdamW to the pieces unless the
/// gradients are not finite, in which case nothing changes. `group` sums a per-rank value over
/// the dp group, for the parts of the decision that differ between ranks (the squares of the
/// pieces each owns, an overflow in them); every rank reaches the same outcome.
#[allow(clippy::too_many_arguments)]
pub fn apply<B: Backend>(
    be: &B,
    u: &Update<'_>,
    params: &mut B::F32,
    work: Option<&mut B::Act>,
    grads: Summed<'_, B>,
    m: &mut B::F32,
    v: &mut B::F32,
    mut group: Option<&mut dyn FnMut(f64) -> Result<f64>>,
    scaler: Option<&mut LossScale>,
) -> Result<Outcome> {
    let (buf, norm_spans, full) = match grads {
        Summed::Full { grads, norm } => (grads, norm.to_vec(), true),
        Summed::Pieces { grads, norm } => (grads, norm.to_vec(), false),
    };
    if let Some(scaler) = scaler {
        // The parts this rank's norm covers: between them, the group's ranks check every sum.
        let scale = scaler.scale;
        let mut overflow = be.unscale_check(buf, &norm_spans, 1.0 / scale)?;
        if let Some(sum) = group.as_deref_mut() {
            overflow = sum(f64::from(u8::from(overflow)))? > 0.0;
        }
        if !scaler.update(overflow) {
            return Ok(Outcome { grad_norm: f64::INFINITY, skipped: true, nonfinite: scale <= 1.0 });
        }
    }
    let norm = clip_on(be, buf, &norm_spans, group, u.max_norm)?;
    // A NaN or infinite gradient: AdamW would write NaN into every parameter and both moments,
    // so the update is skipped, on every rank alike (they hold the same norm).
    if !norm.is_finite() {
        return Ok(Outcome { grad_norm: norm, skipped: true, nonfinite: true });
    }
    let g = if full { Grads::Full(&*buf) } else { Grads::Pieces(&*buf) };
    u.optim.update_on(be, u.table, u.pieces, params, work, g, m, v, u.lr, u.step)?;
    Ok(Outcome { grad_norm: norm, skipped: false, nonfinite: false })
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::params::{Chunking, Init, ParamTableBuilder};
    use crate::rng::Rng;

    const OPTIM: AdamW = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

    /// A matrix (decayed) and a bias (not), 26 elements.
    fn table() -> ParamTable {
        let mut b = ParamTableBuilder::new();
        b.add("w", &[4, 5], Init::Normal { std: 0.02 });
        b.add("b", &[6], Init::Zeros);
        b.build(Chunking::whole(1 << 20))
    }

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed, 1);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Runs `apply` on the CPU for `pieces` with full gradients `g` or their pieces: the
    /// parameters, moments and outcome.
    fn run(
        g: &[f32],
        pieces: &[Range<usize>],
        as_pieces: bool,
        max_norm: f64,
        scaler: Option<&mut LossScale>,
    ) -> (Vec<f32>, Vec<f32>, Outcome) {
        let t = table();
        let mut p = seeded(t.len(), 1);
        let shard: usize = pieces.iter().map(|r| r.len()).sum();
        let (mut m, mut v) = (vec![0.0; shard], vec![0.0; shard]);
        let u = Update { optim: &OPTIM, table: &t, pieces, lr: 1e-2, step: 1, max_norm };
        let mut full = g.to_vec();
        let mut parts: Vec<f32> = pieces.iter().flat_map(|r| g[r.clone()].iter().copied()).collect();
        let whole = [0..shard];
        let summed = if as_pieces {
            Summed::Pieces { grads: &mut parts[..], norm: &whole }
        } else {
            Summed::Full { grads: &mut full[..], norm: pieces }
        };
        let o = apply(&Cpu, &u, &mut p, None, summed, &mut m, &mut v, None, scaler).unwrap();
        m.extend(v);
        (p, m, o)
    }

    #[test]
    fn the_pieces_of_a_rank_update_as_the_full_gradients_do() {
        let g = seeded(26, 2);
        let pieces = [2..9, 17..26];
        let (p_full, state_full, o_full) = run(&g, &pieces, false, 0.0, None);
        let (p_part, state_part, o_part) = run(&g, &pieces, true, 0.0, None);
        assert_eq!((p_full.clone(), state_full), (p_part, state_part));
        assert!(!o_full.skipped && !o_part.skipped);
        // Only the pieces moved.
        let before = seeded(26, 1);
        for i in 0..26 {
            let inside = pieces.iter().any(|r| r.contains(&i));
            assert_eq!(p_full[i] != before[i], inside, "element {i}");
        }
    }

    #[test]
    fn clipping_scales_to_the_norm_of_the_owned_pieces() {
        let g: Vec<f32> = (0..26).map(|i| i as f32).collect();
        let pieces = [0..26];
        let (_, _, o) = run(&g, &pieces, false, 1.0, None);
        let want = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((o.grad_norm - want).abs() < 1e-9 * want, "{} vs {want}", o.grad_norm);
        // Clipped to norm 1: the same update as gradients divided by the norm first.
        let scaled: Vec<f32> = g.iter().map(|x| (*x as f64 * (1.0 / (want + 1e-6))) as f32).collect();
        let (p_clipped, _, _) = run(&g, &pieces, false, 1.0, None);
        let (p_scaled, _, _) = run(&scaled, &pieces, false, 0.0, None);
        let worst = p_clipped.iter().zip(&p_scaled).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-6, "clipping differs from pre-scaled gradients by {worst}");
        // The group's squares: two ranks holding the same pieces double them.
        let t = table();
        let (mut p, mut m, mut v, mut full) = (seeded(26, 1), vec![0.0; 26], vec![0.0; 26], g.clone());
        let u = Update { optim: &OPTIM, table: &t, pieces: &pieces, lr: 1e-2, step: 1, max_norm: 0.0 };
        let mut twice = |x: f64| Ok(2.0 * x);
        let summed = Summed::Full { grads: &mut full[..], norm: &pieces };
        let o = apply(&Cpu, &u, &mut p, None, summed, &mut m, &mut v, Some(&mut twice), None).unwrap();
        assert!((o.grad_norm - want * 2f64.sqrt()).abs() < 1e-9 * want);
    }

    #[test]
    fn gradients_that_are_not_finite_change_nothing() {
        let mut g = seeded(26, 3);
        g[7] = f32::NAN;
        let (p, state, o) = run(&g, &[0..26], false, 1.0, None);
        assert!(o.skipped && o.nonfinite && !o.grad_norm.is_finite(), "{o:?}");
        assert_eq!(p, seeded(26, 1));
        assert!(state.iter().all(|x| *x == 0.0), "the moments stay as they were");
    }

    #[test]
    fn an_fp16_overflow_halves_the_scale_and_skips_and_scaled_gradients_are_unscaled() {
        let mut g = seeded(26, 4);
        g[3] = f32::INFINITY;
        let mut s = LossScale::from_state(LossScaleState { scale: 1024.0, good_steps: 0 });
        let (p, _, o) = run(&g, &[0..26], false, 1.0, Some(&mut s));
        assert!(o.skipped && !o.nonfinite, "a lower scale may rescue it: {o:?}");
        assert_eq!((s.scale, p), (512.0, seeded(26, 1)));
        // At the floor scale an overflow is a non-finite step.
        let mut floor = LossScale::from_state(LossScaleState { scale: 1.0, good_steps: 0 });
        let (_, _, o) = run(&g, &[0..26], false, 1.0, Some(&mut floor));
        assert!(o.skipped && o.nonfinite, "{o:?}");
        // Gradients scaled by 8 update as the unscaled ones do.
        let g = seeded(26, 5);
        let scaled: Vec<f32> = g.iter().map(|x| x * 8.0).collect();
        let mut eight = LossScale::from_state(LossScaleState { scale: 8.0, good_steps: 0 });
        let (p_scaled, _, o) = run(&scaled, &[0..26], false, 1.0, Some(&mut eight));
        let (p_plain, _, o_plain) = run(&g, &[0..26], false, 1.0, None);
        assert!(!o.skipped);
        assert_eq!(p_scaled, p_plain);
        assert_eq!(o.grad_norm, o_plain.grad_norm);
    }
}
