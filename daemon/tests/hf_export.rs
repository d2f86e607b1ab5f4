//! The model `gantry train` writes to `RUN_DIR/final/` loads in Hugging Face transformers, whose
//! loss on a token file equals `gantry eval`'s. Needs Python with torch and transformers
//! (`.ci/run` installs them; `GANTRY_PYTHON` picks the interpreter, default `python3`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn last_json(out: std::process::Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Trains a model of `model_config` for a few steps on `tokens` (so the weights are not the init)
/// with the extra spec lines `extra`; returns the run directory.
fn train_run(dir: &Path, model_config: &str, tokens: &Path, extra: &str) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), model_config).unwrap();
    let spec = dir.join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nseq_len = 16\n[train]\nglobal_batch_size = 4\nlr = 1e-2\n{extra}",
            model.display(),
            tokens.display()
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let gantry = env!("CARGO_BIN_EXE_gantry");
    last_json(Command::new(gantry).arg("train").arg(&spec).arg("--run-dir").arg(&run).output().unwrap(), "gantry train");
    run
}

fn check(model_config: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = root().join("tests/fixtures").join(name).join("tokens.u32");
    let run = train_run(dir.path(), model_config, &tokens, "steps = 5\n");
    let gantry = env!("CARGO_BIN_EXE_gantry");
    let final_dir = run.join("final");
    let ours = last_json(
        Command::new(gantry)
            .arg("eval")
            .arg("--model")
            .arg(&final_dir)
            .arg("--data")
            .arg(&tokens)
            .args(["--seq-len", "16"])
            .output()
            .unwrap(),
        "gantry eval",
    );
    let python = std::env::var("GANTRY_PYTHON").unwrap_or_else(|_| "python3".into());
    let theirs = last_json(
        Command::new(&python).arg(root().join("tests/python/hf_eval.py")).arg(&final_dir).arg(&tokens).arg("16").output().unwrap(),
        "transformers (pip install torch transformers)",
    );
    let (a, b) = (ours["loss"].as_f64().unwrap(), theirs["loss"].as_f64().unwrap());
    assert_eq!(ours["tokens"], theirs["tokens"]);
    assert!(((a - b) / b).abs() < 1e-4, "{name}: gantry eval {a} vs transformers {b}");
    assert!(a < 4.5, "{name}: five steps at lr 1e-2 should have moved the loss below ln(96) = 4.56: {a}");
}

#[test]
fn gpt2_final_model_loads_in_transformers() {
    check(
        r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","vocab_size":96,"n_embd":32,"n_layer":2,"n_head":4,"n_positions":64}"#,
        "gpt2",
    );
}

#[test]
fn llama_final_model_loads_in_transformers() {
    check(
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":96,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64,"rope_theta":10000.0,"rms_norm_eps":1e-5}"#,
        "llama_gqa",
    );
}

/// `gantry export` of a run's newest checkpoint, sharded: transformers loads the shards through
/// their index, with the loss `gantry eval` gives on the same directory.
#[test]
fn export_writes_sharded_checkpoints_that_transformers_loads() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64,"tie_word_embeddings":false}"#;
    let tokens = root().join("tests/fixtures/llama_gqa/tokens.u32");
    let run = train_run(dir.path(), config, &tokens, "steps = 6\n[checkpoint]\nevery = 5\n");
    let gantry = env!("CARGO_BIN_EXE_gantry");
    // Export the checkpoint of step 5 (not the final model) in shards of at most 40 KB.
    let out = dir.path().join("export");
    let r = last_json(
        Command::new(gantry)
            .arg("export")
            .arg(run.join("checkpoints/step_00000005"))
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", "40KB"])
            .output()
            .unwrap(),
        "gantry export",
    );
    assert!(r["shards"].as_u64().unwrap() > 1, "{r}");
    assert!(out.join("model.safetensors.index.json").is_file());
    let ours = last_json(
        Command::new(gantry).arg("eval").arg("--model").arg(&out).arg("--data").arg(&tokens).args(["--seq-len", "16"]).output().unwrap(),
        "gantry eval",
    );
    let python = std::env::var("GANTRY_PYTHON").unwrap_or_else(|_| "python3".into());
    let theirs = last_json(
        Command::new(&python).arg(root().join("tests/python/hf_eval.py")).arg(&out).arg(&tokens).arg("16").output().unwrap(),
        "transformers (pip install torch transformers)",
    );
    let (a, b) = (ours["loss"].as_f64().unwrap(), theirs["loss"].as_f64().unwrap());
    assert!(((a - b) / b).abs() < 1e-4, "export: gantry eval {a} vs transformers {b}");
    // Exported again into the same folder in fewer, larger shards: no shard of the first export
    // is left beside them.
    let r2 = last_json(
        Command::new(gantry)
            .arg("export")
            .arg(run.join("checkpoints/step_00000005"))
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", "80KB"])
            .output()
            .unwrap(),
        "gantry export again",
    );
    let shards =
        std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-")).count();
    assert!(r2["shards"].as_u64().unwrap() < r["shards"].as_u64().unwrap(), "{r2} vs {r}");
    assert_eq!(shards as u64, r2["shards"].as_u64().unwrap(), "only this export's shards are there");
    // A run directory exports its final model; a damaged source is refused.
    let whole = dir.path().join("whole");
    let r = last_json(Command::new(gantry).arg("export").arg(&run).arg("--out").arg(&whole).output().unwrap(), "gantry export RUN_DIR");
    assert!(r["source"].as_str().unwrap().ends_with("run/final"), "final/ (step 6) is newer than the checkpoint of step 5: {r}");
    assert!(whole.join("model.safetensors").is_file());
    let bad = Command::new(gantry).arg("export").arg(dir.path()).arg("--out").arg(dir.path().join("x")).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("neither a model directory nor a run directory"));

    // The run continued with --resume to 12 steps, and stopped before it wrote its own final/:
    // final/ is still that of step 6, older than the checkpoint of step 10, which is exported.
    let final_dir = run.join("final");
    let of_step_6 = dir.path().join("final-of-step-6");
    std::fs::create_dir(&of_step_6).unwrap();
    for f in std::fs::read_dir(&final_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), of_step_6.join(f.file_name())).unwrap();
    }
    last_json(
        Command::new(gantry).arg("train").arg("--resume").arg(&run).args(["--set", "train.steps=12"]).output().unwrap(),
        "gantry train --resume",
    );
    std::fs::remove_dir_all(&final_dir).unwrap();
    std::fs::rename(&of_step_6, &final_dir).unwrap();
    let out = Command::new(gantry).arg("export").arg(&run).arg("--out").arg(dir.path().join("continued")).output().unwrap();
    let note = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = last_json(out, "gantry export of a continued run");
    assert!(r["source"].as_str().unwrap().ends_with("checkpoints/step_00000010"), "{r}");
    assert!(note.contains("is of step 6, and the run went on to step 10"), "{note}");
}
