//! End-to-end tests of the `gantry` binary: train, eval, bench, prepare, and spec errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gantry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gantry failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("no output")).expect("last line is JSON")
}

/// A small spec over the example corpus, written next to copies of what it needs.
fn write_spec(dir: &Path, extra: &str) -> PathBuf {
    let ex = root().join("examples");
    let spec = format!(
        r#"
[model]
path = "{model}"
[data]
train = "{corpus}"
tokenizer = "{tok}"
seq_len = 32
[train]
steps = 12
global_batch_size = 4
micro_batch_size = 2
lr = 3e-3
warmup_steps = 2
{extra}
"#,
        model = ex.join("tiny-gpt2/model").display(),
        corpus = ex.join("data/corpus.txt").display(),
        tok = ex.join("data/tokenizer.json").display(),
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

#[test]
fn train_writes_metrics_and_a_final_model_that_eval_reads() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[checkpoint]\nevery = 5\nkeep = 1\n");
    let run = dir.path().join("run");
    let out = ok(gantry().args(["train"]).arg(&spec).args(["--set", "train.seed=7", "--run-dir"]).arg(&run).output().unwrap());
    let summary = last_json(&out);
    assert_eq!(summary["steps"], 12);

    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["step"], i as u64 + 1);
        for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(m[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "step {}: {key} = {}", i + 1, m[key]);
        }
        // Parameters, gradients and two AdamW moments, all fp32.
        assert_eq!(m["mem_bytes"], 891_648u64 * 16);
    }
    assert!((lines[0]["lr"].as_f64().unwrap() - 1.5e-3).abs() < 1e-12, "warmup: half the peak lr at step 1 of 2");
    let (first, last) = (lines[0]["loss"].as_f64().unwrap(), lines[11]["loss"].as_f64().unwrap());
    assert!((first - 512f64.ln()).abs() < 0.1, "a fresh model predicts uniformly: {first}");
    assert!(last < first - 0.5, "12 steps at lr 3e-3 must lower the loss: {first} → {last}");

    // keep = 1: only the newest intermediate checkpoint survives.
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(ckpts, vec![std::ffi::OsString::from("step_00000010")]);
    let stored = std::fs::read_to_string(run.join("spec.toml")).unwrap();
    assert!(stored.contains("seed = 7"), "the run keeps its resolved spec");

    let final_dir = run.join("final");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(final_dir.join(f).is_file(), "final/{f} is missing");
    }
    let corpus = root().join("examples/data/corpus.txt");
    let ev = last_json(&ok(gantry()
        .args(["eval", "--model"])
        .arg(&final_dir)
        .arg("--data")
        .arg(&corpus)
        .args(["--seq-len", "64", "--batch", "16"])
        .output()
        .unwrap()));
    let loss = ev["loss"].as_f64().unwrap();
    assert!(loss < first - 0.3 && loss > 1.0, "eval loss of the trained model: {loss}");
    assert_eq!(ev["tokens"].as_u64().unwrap() % 64, 0);
}

#[test]
fn training_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "steps = 3");
    let spec_text = std::fs::read_to_string(&spec).unwrap().replace("steps = 12\n", "");
    std::fs::write(&spec, spec_text).unwrap();
    let losses = |run: &str| -> Vec<String> {
        let run = dir.path().join(run);
        ok(gantry().arg("train").arg(&spec).arg("--run-dir").arg(&run).output().unwrap());
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
            .collect()
    };
    let (a, b) = (losses("a"), losses("b"));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "same seed and threads, same bits");
}

#[test]
fn eval_matches_transformers_on_the_fixtures() {
    for name in ["gpt2", "llama_gqa", "llama_tied", "llama_legacy_rope"] {
        let fx = root().join("tests/fixtures").join(name);
        let out = ok(gantry()
            .args(["eval", "--model"])
            .arg(fx.join("model"))
            .arg("--data")
            .arg(fx.join("tokens.u32"))
            .args(["--seq-len", "16", "--batch", "5"])
            .output()
            .unwrap());
        let got = last_json(&out);
        // eval_loss is stored in expected.safetensors (the JSON sidecar has the settings).
        let bytes = std::fs::read(fx.join("expected.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let d = st.tensor("eval_loss").unwrap().data().to_vec();
        let want = f32::from_le_bytes([d[0], d[1], d[2], d[3]]) as f64;
        let loss = got["loss"].as_f64().unwrap();
        assert!(((loss - want) / want).abs() < 1e-4, "{name}: gantry eval {loss} vs transformers {want}");
        assert_eq!(got["tokens"], 256);
    }
}

#[test]
fn bad_specs_name_the_field_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "");
    let cases = [
        (vec!["--set", "train.learning_rate=1"], "train.learning_rate"),
        (vec!["--set", "train.lr=-1"], "train.lr"),
        (vec!["--set", "train.precision=fp8"], "train.precision"),
        // Without a GPU (or in a build without CUDA) a GPU job is refused before anything is written.
        (vec!["--set", "resources.devices=cuda:0"], "cuda:0"),
        (vec!["--set", "train.precision=bf16"], "needs a GPU"),
        (vec!["--set", "data.seq_len=100000"], "data.seq_len"),
        // A tokenizer that is not there: refused at the start, not at the first checkpoint.
        (vec!["--set", "data.tokenizer=/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
        // A value the check refuses: its own message, not a complaint about the value's type.
        (vec!["--set", "train.steps=0"], "at least 1"),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let run = dir.path().join(format!("run{i}"));
        let out = gantry().arg("train").arg(&spec).args(args).arg("--run-dir").arg(&run).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: error does not name {needle}: {stderr}");
        assert!(!run.exists(), "{args:?}: a failed start created the run directory");
    }
    let bad_model = dir.path().join("m");
    std::fs::create_dir(&bad_model).unwrap();
    std::fs::write(bad_model.join("config.json"), r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":64,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#).unwrap();
    let out = gantry()
        .arg("train")
        .arg(&spec)
        .arg("--set")
        .arg(format!("model.path={}", bad_model.display()))
        .arg("--run-dir")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("rope_scaling") && stderr.contains("yarn"), "{stderr}");
}

#[test]
fn prepare_tokenizes_text_into_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("docs.jsonl");
    std::fs::write(&text, "{\"text\": \"Permission is hereby granted\"}\n{\"text\": \"free of charge\"}\n").unwrap();
    let out = dir.path().join("docs.bin");
    let tok = root().join("examples/data/tokenizer.json");
    let r = last_json(&ok(gantry().arg("prepare").arg(&text).arg("--tokenizer").arg(&tok).arg("--out").arg(&out).output().unwrap()));
    let n = r["tokens"].as_u64().unwrap() as usize;
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), 2 * n);
    let ids: Vec<u16> = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(ids.iter().filter(|t| **t == 0).count(), 2, "each document ends with <|endoftext|> (id 0)");
    assert!(n > 4 && n < 40, "{n} tokens for 44 characters");
    // A write that fails (here: the output is a directory) says so and leaves no partial file.
    let blocked = dir.path().join("blocked.bin");
    std::fs::create_dir(&blocked).unwrap();
    let out = gantry().arg("prepare").arg(&text).arg("--tokenizer").arg(&tok).arg("--out").arg(&blocked).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("blocked.bin"), "{err}");
    let left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|f| f.ends_with(".tmp") || f.ends_with(".partial")), "the partial file was removed: {left:?}");
}

#[test]
fn bench_reports_throughput_and_flops() {
    let out = ok(gantry()
        .args(["bench", "--model", "gpt2-tiny", "--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1"])
        .output()
        .unwrap());
    let r = last_json(&out);
    let tps = r["tokens_per_s"].as_f64().unwrap();
    let step_ms = r["step_ms"].as_f64().unwrap();
    assert!((tps - 64.0 / (step_ms / 1e3)).abs() / tps < 1e-9, "tokens_per_s is batch·seq over the median step");
    let n = r["params"].as_f64().unwrap();
    assert_eq!(n, (8192 * 256 + 1024 * 256 + 4 * (12 * 256 * 256 + 13 * 256) + 2 * 256) as f64);
    // 6N (without position embeddings) + 6·L·C·T per token.
    let per_token = 6.0 * (n - 1024.0 * 256.0) + 6.0 * 4.0 * 256.0 * 32.0;
    assert!((r["model_flops_per_s"].as_f64().unwrap() / tps - per_token).abs() / per_token < 1e-9);
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 10 << 20);
    // Counts of zero are refused with the flag named (they divided by zero, or took the median
    // of nothing).
    for args in [&["bench", "checkpoint", "--every", "0"][..], &["bench", "comm", "--iters", "0"]] {
        let out = gantry().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(args[2]) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `--tp 2`: the model cut across two ranks reports the step's share in the tp group's
/// collectives, the bytes they sent, and each rank's memory; its first loss is one device's.
#[test]
fn bench_tp_reports_the_communication_share_and_each_rank_memory() {
    let args = ["bench", "--model", "gpt2-tiny", "--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1"];
    let one = last_json(&ok(gantry().args(args).output().unwrap()));
    let r = last_json(&ok(gantry().args(args).args(["--tp", "2"]).output().unwrap()));
    assert_eq!(r["tp"].as_u64(), Some(2));
    let (share, comm_ms, step_ms) = (r["comm_share"].as_f64().unwrap(), r["comm_ms"].as_f64().unwrap(), r["step_ms"].as_f64().unwrap());
    assert!(share > 0.0 && share < 1.0 && (share - comm_ms / step_ms).abs() < 1e-9, "{r}");
    // Per step at least: 4 blocks × 4 all-reduces of [64 tokens, 256] (two forward, two
    // backward), the embedding's and the head's input gradient, each 64 KiB on two ranks.
    assert!(r["comm_bytes_per_step"].as_u64().unwrap() >= 18 * 64 * 1024, "{r}");
    let ratio = r["mem_bytes"].as_f64().unwrap() / r["whole_mem_bytes"].as_f64().unwrap();
    assert!((0.5..0.55).contains(&ratio), "a rank holds {ratio}× of one device's model state");
    assert_eq!(r["whole_mem_bytes"].as_u64(), one["mem_bytes"].as_u64());
    let (a, b) = (one["loss_first"].as_f64().unwrap(), r["loss_first"].as_f64().unwrap());
    assert!((a - b).abs() / a < 1e-5, "the first step's loss: {b} cut, {a} whole");
    // split_gather: the same first loss, and less of the activations on each rank.
    let sg = last_json(&ok(gantry().args(args).args(["--tp", "2", "--sp-mode", "split_gather"]).output().unwrap()));
    assert_eq!(sg["sp_mode"], "split_gather");
    assert!((sg["loss_first"].as_f64().unwrap() - a).abs() / a < 1e-5, "{sg}");
    assert!(sg["activation_bytes"].as_u64() < r["activation_bytes"].as_u64(), "{sg} against {r}");
    let out = gantry().args(args).args(["--sp", "2", "--sp-mode", "split_gather"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs --tp > 1"), "{err}");
    // The sequence split over its own axis: each rank holds the whole model and about half of
    // the activations, with one device's first loss.
    for mode in ["all_to_all", "ring_attn"] {
        let r = last_json(&ok(gantry().args(args).args(["--sp", "2", "--sp-mode", mode]).output().unwrap()));
        assert_eq!((r["sp"].as_u64(), r["sp_mode"].as_str()), (Some(2), Some(mode)));
        assert!((r["loss_first"].as_f64().unwrap() - a).abs() / a < 1e-5, "{r}");
        let acts = r["activation_bytes"].as_f64().unwrap() / r["whole_activation_bytes"].as_f64().unwrap();
        assert!(acts < 0.6 && r["comm_share"].as_f64().unwrap() > 0.0, "{mode}: {r}");
        assert_eq!(r["mem_bytes"].as_u64(), one["mem_bytes"].as_u64());
    }
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn gradient_accumulation_matches_one_big_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "");
    let (a, b) = (dir.path().join("accumulated"), dir.path().join("whole"));
    ok(gantry().arg("train").arg(&spec).args(["--set", "train.steps=4", "--run-dir"]).arg(&a).output().unwrap());
    ok(gantry()
        .arg("train")
        .arg(&spec)
        .args(["--set", "train.steps=4", "--set", "train.micro_batch_size=4", "--run-dir"])
        .arg(&b)
        .output()
        .unwrap());
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        assert!(((x - y) / y).abs() < 1e-5, "2 micro-batches of 2 vs 1 of 4: {la:?} vs {lb:?}");
    }
}

/// A new run into a directory that holds an earlier run moves the earlier run aside (`DIR.1`)
/// rather than mixing the two; nothing of either is lost.
#[test]
fn a_new_run_into_an_earlier_runs_directory_moves_the_earlier_run_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "");
    let run = dir.path().join("run");
    let train = |seed: &str, steps: &str| {
        let out = gantry().arg("train").arg(&spec).args(["--set", seed, "--set", steps, "--run-dir"]).arg(&run).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    train("train.seed=1", "train.steps=6");
    let first = losses(&run);
    let stderr = train("train.seed=2", "train.steps=3");
    assert!(stderr.contains("held an earlier run") && stderr.contains("run.1"), "{stderr}");
    assert_eq!(losses(&dir.path().join("run.1")), first, "the earlier run is kept whole");
    assert_eq!(losses(&run).len(), 3, "the new run has only its own steps");
    assert!(dir.path().join("run.1/final/model.safetensors").is_file() && run.join("final/model.safetensors").is_file());
}

/// The README's main command: the example trains in well under a minute and its loss falls by
/// at least 40%.
#[test]
fn the_example_spec_trains_and_its_loss_falls_by_40_percent() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(gantry().arg("train").arg(root().join("examples/tiny-gpt2/spec.toml")).arg("--run-dir").arg(&run).output().unwrap());
    let l = losses(&run);
    assert_eq!(l.len(), 300);
    let (first, last) = (l[0], l[l.len() - 1]);
    assert!(last <= 0.6 * first, "loss {first:.4} → {last:.4}");
}

#[test]
fn devices_lists_the_cpu_slots_and_the_gpus_or_why_there_are_none() {
    let r = last_json(&ok(gantry().args(["devices", "--json"]).output().unwrap()));
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(r["cpu"]["cores"], cores);
    assert_eq!(r["cpu"]["devices"], format!("cpu:{cores}"));
    let gpus = r["cuda"].as_array().unwrap();
    if gpus.is_empty() {
        // No GPU here: the reason is given (no driver, or a build without CUDA).
        let why = r["cuda_error"].as_str().unwrap();
        assert!(why.contains("driver") || why.contains("without CUDA"), "{why}");
    } else {
        assert!(gpus[0]["memory_bytes"].as_u64().unwrap() > 1 << 30, "{r}");
    }
}

/// The CUDA kernels compile through NVRTC without a GPU (builds with the `cuda` feature; where
/// NVRTC is missing the command must say so, and `scripts/test` installs it).
#[test]
fn kernels_check_compiles_every_cuda_source_for_sm_80_and_sm_90() {
    let out = gantry().args(["kernels", "check"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let required = std::env::var("GANTRY_REQUIRE_NVRTC").as_deref() == Ok("1");
        assert!(!required && (stderr.contains("without CUDA") || stderr.contains("NVRTC")), "{stderr}");
        return;
    }
    let r = last_json(&String::from_utf8_lossy(&out.stdout));
    let sources = std::fs::read_dir(root().join("kernels/cuda"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cu"))
        .count();
    assert_eq!(r["kernels"], sources as u64);
    assert_eq!(r["compiled"], sources as u64);
    assert_eq!(r["archs"], serde_json::json!(["sm_80", "sm_90"]));
    assert_eq!(stderr.matches("  ok ").count(), 2 * sources, "{stderr}");
}

#[test]
fn gpu_work_without_a_gpu_is_refused_with_the_reason() {
    let out = gantry()
        .args(["bench", "--model", "gpt2-tiny", "--seq-len", "32", "--batch", "1", "--device", "cuda:0", "--precision", "bf16"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // This machine has a GPU: the run reports it.
        let r = last_json(&String::from_utf8_lossy(&out.stdout));
        assert!(r["device"].as_str().unwrap().starts_with("cuda:0"), "{r}");
        return;
    }
    assert!(stderr.contains("driver") || stderr.contains("without CUDA"), "{stderr}");
    let out = gantry().args(["bench", "--model", "gpt2-tiny", "--seq-len", "32", "--batch", "1", "--precision", "bf16"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("fp32"), "bf16 on the CPU is refused");
}

/// A layout the trainer cannot run (ZeRO-2 across GPUs, or GPUs in a build without CUDA) is
/// refused, naming the field, before any rank starts or anything is written.
#[test]
fn a_gpu_layout_the_trainer_cannot_run_is_refused_before_any_rank_starts() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "");
    let run = dir.path().join("run");
    let out = gantry()
        .arg("train")
        .arg(&spec)
        .args(["--set", "resources.devices=\"cuda:0,1\"", "--set", "parallel.dp=2", "--set", "parallel.zero=2", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    if cfg!(feature = "cuda") {
        assert!(stderr.contains("parallel.zero") && stderr.contains("ZeRO-2 on GPUs"), "{stderr}");
    } else {
        assert!(stderr.contains("without CUDA"), "{stderr}");
    }
    assert!(!stderr.contains("ranks (rank 0 here"), "no rank was started: {stderr}");
    assert!(!run.exists(), "nothing was written");
}

#[test]
fn a_daemon_told_to_schedule_gpus_it_does_not_have_refuses_to_start() {
    let r = last_json(&ok(gantry().args(["devices", "--json"]).output().unwrap()));
    let have = r["cuda"].as_array().unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let mut child = gantry()
        .args(["daemon", "--devices", &format!("cuda:{have}"), "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that starts runs until stopped: a bounded wait makes that a failure, not a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started on a GPU this machine lacks");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started on a GPU this machine lacks");
    assert!(stderr.contains(&format!("--devices cuda:{have}")), "the error names the setting: {stderr}");
}

#[test]
fn bench_pp_reports_the_measured_bubble_beside_the_theory() {
    let args = ["bench", "--model", "llama-tiny", "--seq-len", "16", "--batch", "1", "--steps", "2", "--warmup", "1", "--threads", "2"];
    let run = |schedule: &str| {
        let r =
            last_json(&ok(gantry().args(args).args(["--pp", "2", "--pp-schedule", schedule, "--micro-batches", "4"]).output().unwrap()));
        assert_eq!((r["pp"].as_u64(), r["pp_schedule"].as_str(), r["micro_batches"].as_u64()), (Some(2), Some(schedule), Some(4)), "{r}");
        let bubble = r["bubble_fraction"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{r}");
        r
    };
    let (gpipe, one_f_one_b, zbv) = (run("gpipe"), run("1f1b"), run("zbv"));
    // (p − 1)/(m + p − 1) at p = 2, m = 4.
    assert!((one_f_one_b["bubble_theory"].as_f64().unwrap() - 0.2).abs() < 1e-12, "{one_f_one_b}");
    // The same weights and data under every schedule: the same loss.
    let loss = gpipe["loss_first"].as_f64().unwrap();
    for r in [&one_f_one_b, &zbv] {
        assert!((r["loss_first"].as_f64().unwrap() - loss).abs() < 1e-6 * loss, "{r} against {gpipe}");
    }
    // GPipe keeps every micro-batch's activations on the first stage; 1F1B at most pp.
    assert_eq!(gpipe["peak_in_flight"][0].as_u64(), Some(4));
    assert!(one_f_one_b["peak_in_flight"][0].as_u64().unwrap() <= 2, "{one_f_one_b}");
    assert_eq!(zbv["stages"][0].as_array().unwrap().len(), 2, "zbv holds two chunks per rank: {zbv}");
    let out = gantry().args(args).args(["--pp", "2", "--pp-schedule", "zbv", "--pp-chunks", "3"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pp_chunks"), "{err}");
}
