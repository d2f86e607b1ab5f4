use anyhow::Context;
use gantry_engine::config::ModelInit;
use gantry_engine::data::{check_vocab, load_tokens};
use gantry_engine::train::{evaluate, load_model};

use crate::cli::EvalArgs;
use crate::progress;

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    super::set_threads(a.threads)?;
    anyhow::ensure!(a.seq_len > 0 && a.batch > 0, "--seq-len and --batch must be positive");
    let (model, params) = load_model(&a.model, ModelInit::Pretrained, 0)?;
    let tokenizer = a.tokenizer.clone().or_else(|| Some(a.model.join("tokenizer.json")).filter(|p| p.is_file()));
    let tokens = load_tokens(&a.data, tokenizer.as_deref()).with_context(|| format!("reading {}", a.data.display()))?;
    check_vocab(&tokens, model.config.vocab, &a.data)?;
    let pb = progress::bar(0, "eval [{bar:30}] {pos}/{len} windows {eta}", progress::interactive());
    let r = super::on_pool(|| {
        evaluate(&model, &params, &tokens, a.seq_len, a.batch, |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        })
    })?;
    pb.finish_and_clear();
    anyhow::ensure!(r.windows > 0, "{}: {} tokens hold no window of {} + 1 tokens", a.data.display(), tokens.len(), a.seq_len);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
