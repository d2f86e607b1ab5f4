//! The model `gantry train` writes to `RUN_DIR/final/` loads in Hugging Face transformers, whose
//! loss on a token file equals `gantry eval`'s. Needs Python with torch and transformers
//! (`.ci/run` installs them; `GANTRY_PYTHON` picks the interpreter, default `python3`).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn last_json(out: std::process::Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn check(model_config: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), model_config).unwrap();
    // Train a few steps on the fixture tokens so the exported weights are not the init.
    let tokens = root().join("tests/fixtures").join(name).join("tokens.u32");
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nseq_len = 16\n[train]\nsteps = 5\nglobal_batch_size = 4\nlr = 1e-2\n",
            model.display(),
            tokens.display()
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    let gantry = env!("CARGO_BIN_EXE_gantry");
    last_json(Command::new(gantry).arg("train").arg(&spec).arg("--run-dir").arg(&run).output().unwrap(), "gantry train");
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
