//! Named model shapes for `gantry bench` (no weights needed: benchmarks use a seeded random init).

use std::path::Path;

use super::ModelConfig;
use crate::{Error, Result};

/// `(name, config.json)` of every preset.
pub const PRESETS: &[(&str, &str)] = &[
    // The PyTorch peer's `tiny` shape (shared/bench/torch_gpt.py).
    ("gpt2-tiny", r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":8192,"n_embd":256,"n_layer":4,"n_head":4,"n_positions":1024}"#),
    // GPT-2 124M.
    ("gpt2", r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":50257,"n_embd":768,"n_layer":12,"n_head":12,"n_positions":1024}"#),
    // LLaMA shapes of about the same sizes (GQA 4:1 on the small one, untied heads).
    (
        "llama-tiny",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8192,"hidden_size":256,"intermediate_size":688,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":4,"max_position_embeddings":1024,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
    ),
    (
        "llama-small",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":768,"intermediate_size":2048,"num_hidden_layers":12,
            "num_attention_heads":12,"num_key_value_heads":4,"max_position_embeddings":2048,"rope_theta":10000.0,"tie_word_embeddings":false}"#,
    ),
];

/// The config of preset `name`, if it is one.
pub fn preset(name: &str) -> Option<Result<ModelConfig>> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(n, json)| ModelConfig::from_json(json, Path::new(n)))
}

/// A model directory's config, or a preset's.
pub fn config_for(model: &str) -> Result<ModelConfig> {
    let dir = Path::new(model);
    if dir.join("config.json").is_file() {
        return ModelConfig::from_dir(dir);
    }
    preset(model).unwrap_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        Err(Error::Config {
            path: dir.into(),
            message: format!("neither a model directory with config.json nor a preset ({})", names.join(", ")),
        })
    })
}
