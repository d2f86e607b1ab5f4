//! Hugging Face model directories: loading weights (`model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`) into the flat parameter buffer, and writing a directory that
//! `transformers` loads (`config.json` + `model.safetensors`, plus the tokenizer if there is one).

mod hf;

pub use hf::{has_weights, load_weights, save_hf_dir};
