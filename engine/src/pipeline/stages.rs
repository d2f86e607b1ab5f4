//! Cutting a model into pipeline stages (`parallel.pp`, `parallel.pp_layers`): contiguous block
//! ranges, the embedding with the first stage and the final norm, head and loss with the last.
//!
//! By default the cut balances the estimated cost of each stage, not its layer count: every
//! block costs its projections', MLP's and attention's FLOPs per token; the last stage also pays
//! the head's `[hidden, vocab]` product, which on a small model with a large vocabulary weighs as
//! much as several blocks. The slowest stage sets a pipeline's pace, so the cut minimises the
//! largest stage's cost (an exact search over the contiguous cuts). `parallel.pp_layers` states
//! the cut instead.

use std::ops::Range;

use crate::models::{Arch, ModelConfig};
use crate::{Error, Result};

/// Forward FLOPs per token of one block at sequence length `seq` (backward is about twice that
/// for every block alike, so it does not move the cut).
pub fn block_flops(c: &ModelConfig, seq: usize) -> f64 {
    let (h, d) = (c.hidden as f64, c.head_dim as f64);
    let qkv = h * (c.heads + 2 * c.kv_heads) as f64 * d;
    let out = c.heads as f64 * d * h;
    let mlp = match c.arch {
        Arch::Gpt2 => 2.0 * h * c.intermediate as f64,
        Arch::Llama => 3.0 * h * c.intermediate as f64,
    };
    // Causal attention: each token's scores and weighted sum over half the sequence on average.
    let attention = 2.0 * c.heads as f64 * d * seq as f64 / 2.0;
    2.0 * (qkv + out + mlp) + 2.0 * attention
}

/// Forward FLOPs per token of the head (the vocabulary product; the loss is small beside it).
pub fn head_flops(c: &ModelConfig) -> f64 {
    2.0 * c.hidden as f64 * c.vocab as f64
}

/// The block ranges of `stages` stages for `config` at sequence length `seq`: `layers` when
/// given (`parallel.pp_layers`, checked), else the cut that balances the estimated cost.
pub fn split_stages(config: &ModelConfig, stages: usize, seq: usize, layers: Option<&[usize]>) -> Result<Vec<Range<usize>>> {
    let l = config.layers;
    let bad = |field: &str, message: String| Error::Unsupported { field: field.into(), message };
    if stages == 0 || stages > l {
        return Err(bad("parallel.pp", format!("{stages} pipeline stages for a model of {l} blocks: each stage needs a block")));
    }
    if let Some(layers) = layers {
        let total: usize = layers.iter().sum();
        if layers.len() != stages || total != l || layers.contains(&0) {
            return Err(bad(
                "parallel.pp_layers",
                format!("{layers:?} does not cut {l} blocks into {stages} stages of at least one block: the counts must add up to {l}"),
            ));
        }
        let mut at = 0;
        return Ok(layers
            .iter()
            .map(|&n| {
                at += n;
                at - n..at
            })
            .collect());
    }
    let (block, head) = (block_flops(config, seq), head_flops(config));
    // cost(i, j): blocks i..j as one stage, with the head when j == l.
    let cost = |i: usize, j: usize| (j - i) as f64 * block + if j == l { head } else { 0.0 };
    // best[k][j]: the least possible largest cost cutting blocks 0..j into k stages.
    let mut best = vec![vec![f64::INFINITY; l + 1]; stages + 1];
    let mut from = vec![vec![0usize; l + 1]; stages + 1];
    best[0][0] = 0.0;
    for k in 1..=stages {
        for j in k..=l {
            for i in (k - 1)..j {
                let c = best[k - 1][i].max(cost(i, j));
                // Ties go to the later cut: earlier stages a block heavier, the head's stage lighter.
                if c <= best[k][j] {
                    (best[k][j], from[k][j]) = (c, i);
                }
            }
        }
    }
    let mut cuts = vec![l];
    let mut j = l;
    for k in (1..=stages).rev() {
        j = from[k][j];
        cuts.push(j);
    }
    cuts.reverse();
    Ok(cuts.windows(2).map(|w| w[0]..w[1]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(layers: usize, vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":512,"intermediate_size":1376,
                "num_hidden_layers":{layers},"num_attention_heads":8,"num_key_value_heads":2,"max_position_embeddings":2048}}"#
        );
        ModelConfig::from_json(&json, std::path::Path::new("config.json")).unwrap()
    }

    /// Without a head worth a block the cut is even; a heavy head (the 34M LLaMA's vocabulary of
    /// 16384 costs about three of its blocks) takes blocks off the last stage; uneven cuts work.
    #[test]
    fn the_cut_balances_the_estimated_cost() {
        let small = llama(8, 64);
        assert_eq!(split_stages(&small, 4, 64, None).unwrap(), vec![0..2, 2..4, 4..6, 6..8]);
        let big = llama(8, 16384);
        let cut = split_stages(&big, 2, 64, None).unwrap();
        assert!(cut[1].len() < cut[0].len(), "the head's stage holds fewer blocks: {cut:?}");
        let (b, h) = (block_flops(&big, 64), head_flops(&big));
        assert!(h > 2.0 * b, "the head weighs more than two blocks: {h} vs {b}");
        let stage_cost = |r: &Range<usize>| r.len() as f64 * b + if r.end == 8 { h } else { 0.0 };
        let worst = cut.iter().map(stage_cost).fold(0.0, f64::max);
        // No other cut of 8 blocks into two has a lighter heaviest stage.
        for k in 1..8 {
            let other = [0..k, k..8].iter().map(stage_cost).fold(0.0, f64::max);
            assert!(worst <= other, "{cut:?} is heavier than a cut at {k}");
        }
        let six = split_stages(&llama(6, 64), 4, 64, None).unwrap();
        assert_eq!(six.iter().map(|r| r.len()).sum::<usize>(), 6);
        assert!(six.iter().all(|r| !r.is_empty()) && six.windows(2).all(|w| w[0].end == w[1].start), "{six:?}");
    }

    #[test]
    fn a_stated_cut_is_taken_and_a_wrong_one_refused_by_field() {
        let c = llama(6, 64);
        assert_eq!(split_stages(&c, 3, 64, Some(&[1, 2, 3])).unwrap(), vec![0..1, 1..3, 3..6]);
        let field = |e: Error| match e {
            Error::Unsupported { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(field(split_stages(&c, 3, 64, Some(&[1, 2, 2])).unwrap_err()), "parallel.pp_layers");
        assert_eq!(field(split_stages(&c, 3, 64, Some(&[3, 3])).unwrap_err()), "parallel.pp_layers");
        assert_eq!(field(split_stages(&c, 3, 64, Some(&[0, 3, 3])).unwrap_err()), "parallel.pp_layers");
        assert_eq!(field(split_stages(&c, 7, 64, None).unwrap_err()), "parallel.pp");
    }
}
