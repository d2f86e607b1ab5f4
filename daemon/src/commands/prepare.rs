use anyhow::Context;
use gantry_engine::data::{encode_text_file, load_tokenizer, TokenFormat};

use crate::cli::PrepareArgs;
use crate::progress;

pub fn run(a: PrepareArgs) -> anyhow::Result<()> {
    let out_format = TokenFormat::of(&a.out)?;
    anyhow::ensure!(matches!(out_format, TokenFormat::U16 | TokenFormat::U32), "--out must end in .bin (uint16) or .u32 (uint32)");
    let tok = load_tokenizer(&a.tokenizer)?;
    let size = std::fs::metadata(&a.input).with_context(|| format!("reading {}", a.input.display()))?.len();
    let pb = progress::bar(size, "tokenizing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}", true);
    let tokens = encode_text_file(&a.input, &tok, |n| pb.inc(n))?;
    pb.finish_and_clear();
    let vocab = tok.get_vocab_size(true);
    if out_format == TokenFormat::U16 {
        if let Some(t) = tokens.iter().find(|t| **t > u16::MAX as u32) {
            anyhow::bail!("token id {t} does not fit the uint16 .bin format (vocabulary of {vocab}); write a .u32 file instead");
        }
    }
    // Written beside the output, synced, then renamed over it: an earlier file of that name
    // stays whole until the new one is, and a failed write (a full disk) leaves nothing behind.
    gantry_engine::checkpoint::write_replacing_with(&a.out, |w| {
        for t in &tokens {
            if out_format == TokenFormat::U16 {
                w.write_all(&(*t as u16).to_le_bytes())?;
            } else {
                w.write_all(&t.to_le_bytes())?;
            }
        }
        Ok(())
    })?;
    eprintln!("{}: {} tokens from {} bytes (vocabulary {vocab})", a.out.display(), tokens.len(), size);
    println!("{}", serde_json::json!({"tokens": tokens.len(), "bytes": size, "out": a.out}));
    Ok(())
}
