//! Hugging Face model directories: loading weights (`model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`) into the flat parameter buffer, and writing a directory that
//! `transformers` loads (`config.json` + `model.safetensors`, plus the tokenizer if there is one).
//! Training checkpoints are such a directory plus the optimizer state and the step.

mod hf;
mod sharded;
mod state;

pub use hf::{
    final_step, has_weights, is_plain_file_name, load_weights, save_hf_config, save_hf_dir, save_hf_dir_sharded, weight_file_paths,
    write_final_step, write_replacing, write_replacing_with, FINAL_STEP_FILE,
};
pub use sharded::{shard_name, write_rank_shard};
pub use state::{
    checkpoint_loss_scale, checkpoint_step, commit_checkpoint, committed_checkpoints, is_training_checkpoint, load_checkpoint_params,
    load_training_checkpoint, newest_intact_checkpoint, partial_dir, record_sums, replace_dir, save_training_checkpoint, verify_checkpoint,
    LossScaleState, TrainingState,
};
