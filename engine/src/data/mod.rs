//! Training data: token files and the sampler that turns them into batches.

mod sampler;
mod tokens;

pub use sampler::Sampler;
pub use tokens::{check_vocab, encode_text_file, load_tokenizer, load_tokens, TokenFormat, Tokens};
