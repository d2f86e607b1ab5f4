//! What one rank will hold in memory, from the model's config and the job's layout, before
//! anything is allocated: the daemon refuses a job whose ranks cannot fit its node at submission,
//! rather than accept it and have every attempt abort when an allocation fails.
//!
//! The terms follow the buffers the trainer allocates (see `Trainer::with_comm` and
//! `DataParallel`): parameters, gradients and AdamW's moments in f32 (sharded as the ZeRO stage
//! says), the activation buffers of one micro-batch (`Model::activation_bytes`, the same lengths
//! the model allocates), and the host copy asynchronous checkpoints write from.

use crate::config::{ParallelPlan, Precision, TrainConfig};

use crate::models::{Model, ModelConfig};
use crate::Result;

/// One rank's memory, in bytes, by what holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// Text data tokenized in memory, the checkpoint writer's host copy.
    pub other: u64,
}

impl MemoryPlan {
    pub fn per_rank(&self) -> u64 {
        [self.gradients, self.optimizer, self.activations, self.other].into_iter().fold(self.parameters, u64::saturating_add)
    }

    /// The term that weighs most, as the spec key that shrinks it: `train.micro_batch_size` for
    /// activations, `parallel.zero` for the state (when a higher stage would shard more of it),
    /// else the model itself (`model.path`).
    pub fn field_to_change(&self, plan: &ParallelPlan) -> &'static str {
        let state = self.parameters + self.gradients + self.optimizer;
        if self.activations > state {
            "train.micro_batch_size"
        } else if plan.dp > 1 && plan.zero < 3 {
            "parallel.zero"
        } else {
            "model.path"
        }
    }
}

/// The memory one rank of the run `run` holds training `config`. `text_bytes` is the size of the
/// training data when it is text (it is tokenized into memory; token files are mapped and read
/// through the page cache, which the kernel can always reclaim).
pub fn estimate_memory(run: &TrainConfig, config: &ModelConfig, text_bytes: u64) -> Result<MemoryPlan> {
    // The ranks holding the same parameters (ZeRO shards over them): dp × sp.
    let dp = (run.plan.dp.max(1) * run.plan.sp.max(1)) as u64;
    let zero = if dp > 1 { run.plan.zero } else { 0 };
    // The same chunking the trainer uses (see `Trainer::with_comm`). ZeRO-3 keeps a block's
    // parameters gathered (about a layer's share of the model), the chunk prefetched and a
    // receive buffer; ZeRO-2/3 keep a tensor's gradients until it is final and two chunks of
    // them in flight (see `DataParallel`).
    // Under tensor parallelism, rank 0's part of the model (the largest, cuts being uneven by
    // at most a row); under sequence parallelism, its part of each sequence.
    let tp = crate::models::TpRank { rank: 0, size: run.plan.tp.max(1), split_seq: run.plan.sp_mode == crate::config::SpMode::SplitGather };
    let sp = crate::models::SpRank { rank: 0, size: run.plan.sp.max(1), ring: run.plan.sp_mode == crate::config::SpMode::RingAttn };
    let whole = crate::params::Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS);
    let probe = Model::with_parallel(config.clone(), whole, tp, sp)?;
    let n = probe.table.len() as u64;
    let model = if dp > 1 {
        Model::with_parallel(config.clone(), crate::params::data_parallel_chunking(probe.table.len(), zero), tp, sp)?
    } else {
        probe
    };
    let chunk = model.table.chunks().iter().map(|c| c.range.len() as u64).max().unwrap_or(0);
    let block = n / config.layers.max(1) as u64;
    let shard = n.div_ceil(dp);
    let parameters = 4 * if zero >= 3 { (shard + block + 2 * chunk).min(n) } else { n };
    let gradients = 4 * if zero >= 2 { (shard + 3 * chunk).min(n) } else { n };
    let optimizer = 8 * if zero >= 1 { shard } else { n };
    let (batch, seq) = sp.local_batch(run.optim.micro_batch, run.data.seq_len);
    let activations = model.activation_bytes(batch, seq);
    let on_gpu = run.on_gpu();
    // A GPU rank keeps a 16-bit working copy beside the f32 masters; a CPU rank 0 under DDP keeps
    // a host copy of the parameters and moments for the checkpoint writer.
    let copy = if on_gpu {
        if run.precision == Precision::Fp32 {
            0
        } else {
            2 * n
        }
    } else if run.checkpoint_every > 0 && zero == 0 {
        4 * 3 * n
    } else {
        0
    };
    // Text becomes u32 token ids (about one per four bytes) while the pieces of text are read.
    let other = copy.saturating_add(text_bytes);
    Ok(MemoryPlan { parameters, gradients, optimizer, activations, other })
}

/// Bytes as `1.5 GiB`, `300 MiB`, `12 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::Devices;

    /// A run at sequence length 32 with a global batch of `global` over `dp` CPU ranks.
    fn run(global: usize, dp: usize, zero: u8) -> TrainConfig {
        let mut c = TrainConfig::new("m", "t.bin");
        c.data.seq_len = 32;
        c.optim.global_batch = global;
        c.with_plan(ParallelPlan::data_parallel(dp, zero), Devices::Cpu(dp), None)
    }

    fn tiny() -> ModelConfig {
        let json =
            r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 96, "n_embd": 32, "n_layer": 8, "n_head": 4, "n_positions": 64}"#;
        ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap()
    }

    /// The activation term is what the model allocates for the same batch shape.
    #[test]
    fn activations_are_the_bytes_the_model_allocates() {
        for json in [
            r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}"#,
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 80, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}"#,
        ] {
            let config = ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
            let whole = crate::params::Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS);
            // One device, and a rank of tp = 2 with split_gather (its own buffer lengths).
            let split = crate::models::TpRank { rank: 1, size: 2, split_seq: true };
            let sg = Model::with_parallel(config.clone(), whole, split, crate::models::SpRank::WHOLE).unwrap();
            for model in [Model::new(config).unwrap(), sg] {
                for (b, t) in [(1, 2), (2, 16), (3, 64)] {
                    assert_eq!(model.activation_bytes(b, t), model.activations(b, t).unwrap().bytes(), "batch {b} seq {t}");
                }
            }
        }
    }

    #[test]
    fn zero_stages_shard_what_they_say() {
        let n = 4 * Model::new(tiny()).unwrap().table.len() as u64;
        let at = |zero: u8| estimate_memory(&run(4, 4, zero), &tiny(), 0).unwrap();
        let one = estimate_memory(&run(1, 1, 0), &tiny(), 0).unwrap();
        assert_eq!((one.parameters, one.gradients, one.optimizer, one.other), (n, n, 2 * n, 0));
        assert_eq!(at(0).optimizer, 2 * n);
        assert_eq!(at(1).optimizer, 2 * n / 4, "ZeRO-1 shards the moments");
        assert_eq!(at(1).gradients, n);
        assert!(at(2).gradients < n && at(2).parameters == n, "ZeRO-2 shards the gradients too");
        assert!(at(3).parameters < n, "ZeRO-3 shards the parameters too");
        assert!(at(3).per_rank() < at(2).per_rank() && at(2).per_rank() < at(1).per_rank() && at(1).per_rank() < at(0).per_rank());
        // Every rank of dp = 4 runs a micro-batch of 1: a quarter of one rank's batch of 4.
        let whole = estimate_memory(&run(4, 1, 0), &tiny(), 0).unwrap();
        assert!(at(0).activations < whole.activations);
        assert_eq!(at(0).field_to_change(&ParallelPlan::default()), "model.path");
    }

    #[test]
    fn a_seventy_billion_parameter_model_needs_terabytes_and_says_which_term() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192}"#;
        let config = ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
        let plan = estimate_memory(&run(1, 1, 0), &config, 0).unwrap();
        // 70.6 B parameters × 16 bytes of state.
        let params = plan.parameters / 4;
        assert!((70_000_000_000..71_000_000_000).contains(&params), "{params}");
        assert!(plan.per_rank() > 1 << 40, "{}", human_bytes(plan.per_rank()));
        assert_eq!(plan.field_to_change(&ParallelPlan::default()), "model.path");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        // A batch whose buffers could not even be sized saturates rather than wraps.
        let absurd = run(i64::MAX as usize, 1, 0);
        assert_eq!(estimate_memory(&absurd, &config, 0).unwrap().per_rank(), u64::MAX);
        assert_eq!(human_bytes(12), "12 B");
    }
}
