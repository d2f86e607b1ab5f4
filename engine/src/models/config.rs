//! Hugging Face `config.json` → [`ModelConfig`].
//!
//! Every key that changes the math is either implemented or refused with an error naming it;
//! keys that only matter to other tools (token ids, dtype, generation settings) are accepted;
//! keys Gantry has never seen are reported in the log so that nothing is ignored silently.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The architectures Gantry implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `GPT2LMHeadModel`: learned positions, LayerNorm, GELU (tanh), biases, tied head.
    Gpt2,
    /// `LlamaForCausalLM`: RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
}

/// A model's shape and numerics, resolved from its config.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub tie_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub initializer_range: f32,
    /// The config as read, written back unchanged on export.
    pub raw: Map<String, Value>,
}

/// Keys with no effect on training math.
const HARMLESS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "task_specific_params",
    "n_ctx",
    "reorder_and_upcast_attn",
    "attention_dropout",
    "pretraining_tp",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "is_decoder",
    "id2label",
    "label2id",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "chunk_size_feed_forward",
    "problem_type",
    "finetuning_task",
    "tie_encoder_decoder",
    "is_encoder_decoder",
    "_attn_implementation",
    "max_length",
    "layer_norm_eps",
];

/// What kind of JSON value `v` is, for messages: a number or a boolean as it is, a string, array
/// or object by its kind only. Errors about a file a user named quote none of its text (the
/// daemon reads files for users who could not read them themselves; see docs/security.md).
pub fn kind_of(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Names of things Gantry knows of (architectures, rope types, activations it does not train):
/// quoting one of them tells nothing of the file but which of them it names.
const KNOWN_NAMES: &[&str] = &[
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "FalconForCausalLM",
    "BertModel",
    "BertForMaskedLM",
    "T5ForConditionalGeneration",
    "ViTModel",
    "ViTForImageClassification",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi",
    "phi3",
    "gpt_neox",
    "gptj",
    "opt",
    "bloom",
    "falcon",
    "bert",
    "t5",
    "vit",
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "su",
    "mrope",
    "relu",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
];

/// A string value of the file, quoted only if it is one of `KNOWN_NAMES` (see `kind_of`).
pub fn known_name(s: &str) -> String {
    if KNOWN_NAMES.contains(&s) {
        format!("\"{s}\"")
    } else {
        "a value Gantry does not know".into()
    }
}

/// A JSON parse error by its kind and place, without the text around it.
pub fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "could not be read",
        Category::Syntax => "is not valid JSON",
        Category::Data => "does not have the expected shape",
        Category::Eof => "ends before the JSON document does",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

struct Reader<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, message: String) -> Error {
        Error::Config { path: self.path.to_path_buf(), message }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.map.get(key) {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v > 0) => Ok(n.as_u64().unwrap_or(0) as usize),
            Some(v) => Err(self.err(format!("`{key}` must be a positive integer, found {}", kind_of(v)))),
            None => Err(self.err(format!("`{key}` is missing"))),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("`{key}` must be a number, found {}", kind_of(v)))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("`{key}` must be true or false, found {}", kind_of(v)))),
        }
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(format!("`{key}` must be a string, found {}", kind_of(v)))),
        }
    }

    /// Refuses a key unless it is absent, null, or equal to the value Gantry implements.
    fn require(&self, key: &str, allowed: &[Value], what: &str) -> Result<()> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if allowed.contains(v) => Ok(()),
            Some(v) => Err(self.err(format!("`{key}` = {} is not supported ({what})", kind_of(v)))),
        }
    }
}

impl ModelConfig {
    /// Whether `other` describes the same network: every resolved field that shapes the
    /// parameters or the arithmetic (not the raw text, nor the initialisation's scale).
    pub fn same_network(&self, other: &ModelConfig) -> bool {
        ModelConfig { raw: Map::new(), initializer_range: 0.0, ..self.clone() }
            == ModelConfig { raw: Map::new(), initializer_range: 0.0, ..other.clone() }
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text, &path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), message: json_error(&e) })?;
        let Value::Object(map) = value else {
            return Err(Error::Config { path: path.into(), message: "expected a JSON object".into() });
        };
        let r = Reader { map: &map, path };
        let arch = detect_arch(&r)?;
        let (cfg, known) = match arch {
            Arch::Gpt2 => gpt2(&r)?,
            Arch::Llama => llama(&r)?,
        };
        // Keys named only when they look like a config's keys (lower-case identifiers): the log is
        // read by users who may not read the file (see `kind_of`).
        let unknown: Vec<&String> = map.keys().filter(|k| !known.contains(&k.as_str()) && !HARMLESS.contains(&k.as_str())).collect();
        let named = |k: &&&String| k.len() <= 64 && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        for key in unknown.iter().filter(named) {
            tracing::warn!(config = %path.display(), key = %key, "config key not known to gantry; it is ignored");
        }
        let others = unknown.iter().filter(|k| !named(k)).count();
        if others > 0 {
            tracing::warn!(config = %path.display(), "{others} other keys not known to gantry are ignored");
        }
        // Dropout is not built: a config that asks for it trains as with dropout 0 (stock GPT-2
        // configs ask for 0.1), which should not go unsaid.
        for key in ["attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout", "summary_first_dropout"] {
            if let Some(p) = map.get(key).and_then(Value::as_f64).filter(|p| *p > 0.0) {
                tracing::warn!(config = %path.display(), key, p, "the config asks for dropout; gantry trains without it (as with 0)");
            }
        }
        cfg.check(path)?;
        Ok(ModelConfig { raw: map, ..cfg })
    }

    fn check(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(Error::Config { path: path.to_path_buf(), message: m });
        if self.head_dim == 0 {
            return err(format!("head_dim is 0 (hidden size {} over {} heads); set head_dim", self.hidden, self.heads));
        }
        if self.arch == Arch::Llama && !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return err(format!("rope_theta must be a positive number, found {}", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return err(format!("the norm epsilon must be ≥ 0, found {}", self.norm_eps));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return err(format!("num_attention_heads ({}) is not a multiple of num_key_value_heads ({})", self.heads, self.kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) && self.arch == Arch::Llama {
            return err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.arch == Arch::Gpt2 && self.heads * self.head_dim != self.hidden {
            return err(format!("n_embd ({}) is not divisible by n_head ({})", self.hidden, self.heads));
        }
        Ok(())
    }

    /// Parameters counted as the usual `6N` FLOP estimate counts them: every weight but the
    /// position embeddings, a tied head once.
    pub fn flop_params(&self, table_len: usize) -> usize {
        match self.arch {
            Arch::Gpt2 => table_len - self.max_positions * self.hidden,
            Arch::Llama => table_len,
        }
    }

    /// Model FLOPs per trained token (forward and backward): `6N + 6·L·C·T`, the attention term
    /// counting the causal half of the score matrix as llm.c and nanoGPT do.
    pub fn flops_per_token(&self, table_len: usize, seq: usize) -> f64 {
        6.0 * self.flop_params(table_len) as f64 + 6.0 * (self.layers * self.heads * self.head_dim * seq) as f64
    }
}

fn detect_arch(r: &Reader<'_>) -> Result<Arch> {
    if let Some(Value::Array(archs)) = r.map.get("architectures") {
        if let Some(Value::String(a)) = archs.first() {
            return match a.as_str() {
                "GPT2LMHeadModel" => Ok(Arch::Gpt2),
                "LlamaForCausalLM" => Ok(Arch::Llama),
                other => Err(r.err(format!(
                    "the architecture {} is not supported (supported: GPT2LMHeadModel, LlamaForCausalLM)",
                    known_name(other)
                ))),
            };
        }
    }
    match r.map.get("model_type").and_then(Value::as_str) {
        Some("gpt2") => Ok(Arch::Gpt2),
        Some("llama") => Ok(Arch::Llama),
        Some(other) => Err(r.err(format!("`model_type` = {} is not supported (supported: gpt2, llama)", known_name(other)))),
        None => Err(r.err("neither `architectures` nor `model_type` says what model this is".into())),
    }
}

type Parsed = (ModelConfig, &'static [&'static str]);

fn gpt2(r: &Reader<'_>) -> Result<Parsed> {
    const KNOWN: &[&str] = &[
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "n_inner",
        "layer_norm_epsilon",
        "activation_function",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "add_cross_attention",
        "tie_word_embeddings",
    ];
    let act = r.str_or("activation_function", "gelu_new")?;
    if !["gelu_new", "gelu_pytorch_tanh"].contains(&act) {
        return Err(r.err(format!(
            "`activation_function` = {} is not supported (gantry implements the tanh GELU: gelu_new, gelu_pytorch_tanh)",
            known_name(act)
        )));
    }
    r.require("scale_attn_weights", &[Value::Bool(true)], "attention scores are always scaled by 1/sqrt(head_dim)")?;
    r.require("scale_attn_by_inverse_layer_idx", &[Value::Bool(false)], "per-layer attention scaling is not implemented")?;
    r.require("add_cross_attention", &[Value::Bool(false)], "cross-attention is not implemented")?;
    let hidden = r.usize("n_embd")?;
    let heads = r.usize("n_head")?;
    let cfg = ModelConfig {
        arch: Arch::Gpt2,
        vocab: r.usize("vocab_size")?,
        hidden,
        layers: r.usize("n_layer")?,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        intermediate: r.opt_usize("n_inner")?.unwrap_or(4 * hidden),
        max_positions: r.usize("n_positions")?,
        norm_eps: r.f64_or("layer_norm_epsilon", 1e-5)? as f32,
        rope_theta: 0.0,
        tie_embeddings: r.bool_or("tie_word_embeddings", true)?,
        attention_bias: true,
        mlp_bias: true,
        initializer_range: r.f64_or("initializer_range", 0.02)? as f32,
        raw: Map::new(),
    };
    Ok((cfg, KNOWN))
}

fn llama(r: &Reader<'_>) -> Result<Parsed> {
    const KNOWN: &[&str] = &[
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "tie_word_embeddings",
        "partial_rotary_factor",
        "sliding_window",
        "use_sliding_window",
    ];
    let act = r.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(r.err(format!("`hidden_act` = {} is not supported (gantry implements SwiGLU with silu)", known_name(act))));
    }
    r.require("partial_rotary_factor", &[serde_json::json!(1.0), serde_json::json!(1)], "rotary embeddings cover the whole head")?;
    r.require("sliding_window", &[], "sliding-window attention is not implemented")?;
    let theta = rope_theta(r)?;
    let hidden = r.usize("hidden_size")?;
    let heads = r.usize("num_attention_heads")?;
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab: r.usize("vocab_size")?,
        hidden,
        layers: r.usize("num_hidden_layers")?,
        heads,
        kv_heads: r.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        head_dim: r.opt_usize("head_dim")?.unwrap_or(hidden / heads),
        intermediate: r.usize("intermediate_size")?,
        max_positions: r.usize("max_position_embeddings")?,
        norm_eps: r.f64_or("rms_norm_eps", 1e-6)? as f32,
        rope_theta: theta as f32,
        tie_embeddings: r.bool_or("tie_word_embeddings", false)?,
        attention_bias: r.bool_or("attention_bias", false)?,
        mlp_bias: r.bool_or("mlp_bias", false)?,
        initializer_range: r.f64_or("initializer_range", 0.02)? as f32,
        raw: Map::new(),
    };
    Ok((cfg, KNOWN))
}

/// `rope_theta` at the top level (older checkpoints) or inside `rope_parameters`
/// (transformers 5); only the default (unscaled) rope type is implemented.
///
/// Both keys are checked before either is used: exporters that write both schemas may put a
/// scaled rope type in one and the plain theta in the other, and a scaling taken for plain would
/// silently change the model.
fn rope_theta(r: &Reader<'_>) -> Result<f64> {
    let mut theta: Option<(&str, f64)> = None;
    for key in ["rope_parameters", "rope_scaling"] {
        match r.map.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(p)) => {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(r.err(format!(
                        "`{key}.rope_type` = {} is not supported (only the default, unscaled rotary embedding)",
                        known_name(kind)
                    )));
                }
                if let Some(t) = p.get("rope_theta") {
                    let t = t.as_f64().ok_or_else(|| r.err(format!("`{key}.rope_theta` must be a number, found {}", kind_of(t))))?;
                    match theta {
                        Some((other, u)) if u != t => {
                            return Err(r.err(format!("`{other}.rope_theta` = {u} and `{key}.rope_theta` = {t} disagree")));
                        }
                        _ => theta = Some((key, t)),
                    }
                }
            }
            Some(v) => return Err(r.err(format!("`{key}` must be an object, found {}", kind_of(v)))),
        }
    }
    match theta {
        Some((_, t)) => Ok(t),
        None => r.f64_or("rope_theta", 10000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(json, Path::new("config.json"))
    }

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":16"#;

    #[test]
    fn rope_theta_is_read_in_both_styles() {
        assert_eq!(parse(&format!("{LLAMA},\"rope_theta\":500000.0}}")).unwrap().rope_theta, 500000.0);
        let c = parse(&format!("{LLAMA},\"rope_parameters\":{{\"rope_type\":\"default\",\"rope_theta\":20000.0}}}}")).unwrap();
        assert_eq!(c.rope_theta, 20000.0);
        assert_eq!(c.kv_heads, 2);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = parse(&format!("{LLAMA},\"rope_scaling\":{{\"rope_type\":\"llama3\",\"factor\":8.0}}}}")).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("llama3"), "{e}");
        let e = parse(&format!("{LLAMA},\"hidden_act\":\"gelu\"}}")).unwrap_err().to_string();
        assert!(e.contains("hidden_act"), "{e}");
        let e = parse(r#"{"architectures":["MistralForCausalLM"]}"#).unwrap_err().to_string();
        assert!(e.contains("MistralForCausalLM"), "{e}");
        let e = parse(r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"n_embd":8,"n_layer":1,"n_head":2,"n_positions":8,"activation_function":"relu"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("activation_function"), "{e}");
        let e = parse(&format!("{LLAMA},\"num_key_value_heads\":3}}")).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse(&format!("{LLAMA},\"head_dim\":null,\"num_attention_heads\":16}}")).unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let e = parse(&format!("{LLAMA},\"rope_theta\":-1.0}}")).unwrap_err().to_string();
        assert!(e.contains("rope_theta"), "{e}");
        let e = parse(&format!("{LLAMA},\"num_key_value_heads\":3}}")).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        // Both schemas at once: a scaled rope in the older key is not hidden by a plain theta in
        // the newer one, and two thetas must agree.
        let both = r#""rope_parameters":{"rope_type":"default","rope_theta":500000.0},"rope_scaling":{"rope_type":"llama3","factor":8.0}"#;
        let e = parse(&format!("{LLAMA},{both}}}")).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("llama3"), "{e}");
        let two = r#""rope_parameters":{"rope_theta":500000.0},"rope_scaling":{"rope_type":"default","rope_theta":10000.0}"#;
        let e = parse(&format!("{LLAMA},{two}}}")).unwrap_err().to_string();
        assert!(e.contains("disagree"), "{e}");
        let same = r#""rope_parameters":{"rope_theta":500000.0},"rope_scaling":{"rope_type":"default","rope_theta":500000.0}"#;
        assert_eq!(parse(&format!("{LLAMA},{same}}}")).unwrap().rope_theta, 500000.0);
    }
}
