use gantry_engine::models::{presets::config_for, Model};
use gantry_engine::train::bench;
use serde_json::json;

use crate::cli::BenchArgs;

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let threads = super::set_threads(a.threads)?;
    let config = config_for(&a.model)?;
    let model = Model::new(config)?;
    eprintln!("bench {}: {} parameters, batch {} × seq {}, {threads} threads", a.model, model.table.len(), a.batch, a.seq_len);
    let run = || {
        bench(&model, a.batch, a.seq_len, a.warmup, a.steps, a.seed, |i, ms| {
            let tag = if i < a.warmup { " (warmup)" } else { "" };
            eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
        })
    };
    let r = super::on_pool(run)?;
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(a.model);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}
