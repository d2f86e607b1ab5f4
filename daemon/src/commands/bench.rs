use gantry_engine::models::{presets::config_for, Model};
use gantry_engine::train::bench;
use serde_json::json;

use crate::cli::{BenchArgs, BenchWhat};

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        Some(BenchWhat::Comm(c)) => return super::bench_comm::run(c),
        Some(BenchWhat::Checkpoint(c)) => return super::bench_checkpoint::run(c),
        None => {}
    }
    // clap requires these without a subcommand.
    let (Some(name), Some(seq_len), Some(batch)) = (a.model.clone(), a.seq_len, a.batch) else {
        anyhow::bail!("gantry bench needs --model, --seq-len and --batch");
    };
    let threads = super::set_threads(a.threads)?;
    let config = config_for(&name)?;
    let model = Model::new(config)?;
    eprintln!("bench {name}: {} parameters, batch {batch} × seq {seq_len}, {threads} threads", model.table.len());
    let run = || {
        bench(&model, batch, seq_len, a.warmup, a.steps, a.seed, |i, ms| {
            let tag = if i < a.warmup { " (warmup)" } else { "" };
            eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
        })
    };
    let r = super::on_pool(run)?;
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(name);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}
