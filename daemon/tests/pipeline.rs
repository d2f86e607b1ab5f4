//! Pipeline parallelism through `gantry train` (one process per rank, over TCP), set by the spec
//! keys users write: every schedule, uneven stages and pp × dp with ZeRO-1 give one rank's
//! per-step losses; each stage's idle share reaches `metrics.jsonl`; a checkpoint written by two
//! stages resumes on one rank and on four; layouts not built yet are refused by field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gantry() -> &'static str {
    env!("CARGO_BIN_EXE_gantry")
}

/// A 6-block LLaMA (GQA 4/2, random init from the seed) and 20,000 tokens below its vocabulary
/// (a motif with noise), with a spec training it for `steps` steps of 8 sequences of 16 tokens in
/// micro-batches of 2 (4 micro-batches a step at dp = 1), a checkpoint every 4 steps.
fn spec(dir: &Path, steps: u64) -> PathBuf {
    let model = dir.join("llama6");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":64,"num_hidden_layers":6,"max_position_embeddings":32,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    let tokens = dir.join("tokens.u32");
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 96) as u32
    };
    let motif: Vec<u32> = (0..37).map(|_| next()).collect();
    let data: Vec<u8> = (0..20_000usize).flat_map(|i| if i % 5 == 4 { next() } else { motif[i % 37] }.to_le_bytes()).collect();
    std::fs::write(&tokens, data).unwrap();
    let path = dir.join("spec.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\npath = {model:?}\ninit = \"random\"\n[data]\ntrain = {tokens:?}\nseq_len = 16\n\
             [train]\nsteps = {steps}\nglobal_batch_size = 8\nmicro_batch_size = 2\nlr = 1e-3\nwarmup_steps = 2\nseed = 3\n\
             [resources]\nthreads = 1\n[checkpoint]\nevery = 4\nkeep = 3\n"
        ),
    )
    .unwrap();
    path
}

fn train(args: &[String]) -> Output {
    Command::new(gantry()).arg("train").args(args).arg("--no-progress").output().unwrap()
}

/// `gantry train SPEC --run-dir RUN` on `ranks` CPU ranks with `sets`; must succeed.
fn train_ok(spec: &Path, run: &Path, ranks: usize, sets: &[&str]) {
    let mut args: Vec<String> = vec![spec.to_string_lossy().into(), "--run-dir".into(), run.to_string_lossy().into()];
    args.extend(layout(ranks, sets));
    let out = train(&args);
    assert!(out.status.success(), "{sets:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn layout(ranks: usize, sets: &[&str]) -> Vec<String> {
    let mut args = vec!["--set".to_string(), format!("resources.devices=\"cpu:{ranks}\"")];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run).iter().map(|v| v["loss"].as_f64().unwrap()).collect()
}

fn assert_close(what: &str, want: &[f64], got: &[f64]) {
    assert_eq!(want.len(), got.len(), "{what}: steps");
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let rel = (a - b).abs() / a;
        assert!(rel <= 1e-4, "{what} step {}: {b} vs {a} ({rel:e})", i + 1);
    }
}

#[test]
fn each_schedule_set_by_its_spec_keys_gives_the_losses_of_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 6);
    train_ok(&spec, &dir.path().join("one"), 1, &[]);
    let one = losses(&dir.path().join("one"));
    assert_eq!(one.len(), 6);
    assert!(metrics(&dir.path().join("one"))[0].get("stage_idle").is_none(), "no stages, no stage_idle");
    for (name, ranks, sets) in [
        ("gpipe", 2, &["parallel.pp=2", "parallel.pp_schedule=\"gpipe\""][..]),
        ("1f1b", 2, &["parallel.pp=2"][..]),
        ("1f1b-uneven", 4, &["parallel.pp=4", "parallel.pp_layers=[1, 2, 2, 1]"][..]),
        ("interleaved", 2, &["parallel.pp=2", "parallel.pp_schedule=\"interleaved\"", "parallel.pp_chunks=2"][..]),
        ("zbv", 2, &["parallel.pp=2", "parallel.pp_schedule=\"zbv\""][..]),
        ("pp2-dp2-zero1", 4, &["parallel.pp=2", "parallel.dp=2", "parallel.zero=1"][..]),
    ] {
        let run = dir.path().join(name);
        train_ok(&spec, &run, ranks, sets);
        assert_close(name, &one, &losses(&run));
        let pp = if name == "1f1b-uneven" { 4 } else { 2 };
        for m in metrics(&run) {
            let idle: Vec<f64> = m["stage_idle"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(idle.len(), pp, "{name}: one idle share per stage: {m}");
            assert!(idle.iter().all(|x| (0.0..1.0).contains(x)), "{name}: {idle:?}");
        }
        assert!(run.join("final/model.safetensors").is_file(), "{name}: the final model is put together");
    }
}

#[test]
fn a_pipeline_checkpoint_resumes_at_pp_1_and_pp_4_with_the_losses_going_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 10);
    let whole = dir.path().join("whole");
    train_ok(&spec, &whole, 1, &[]);
    let want = losses(&whole);
    let tensors = |file: &Path| -> std::collections::BTreeMap<String, Vec<f32>> {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, t)| (n, t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
            .collect()
    };
    let want_final = tensors(&whole.join("final/model.safetensors"));
    for (to, ranks, sets) in [("pp1", 1, &["parallel.pp=1"][..]), ("pp4", 4, &["parallel.pp=4"][..])] {
        let run = dir.path().join(to);
        train_ok(&spec, &run, 2, &["parallel.pp=2"]);
        // The checkpoints and the final model are the whole model's, as one rank writes them.
        let fin = tensors(&run.join("final/model.safetensors"));
        assert_eq!(fin.keys().collect::<Vec<_>>(), want_final.keys().collect::<Vec<_>>());
        for (name, w) in &want_final {
            let worst = w.iter().zip(&fin[name]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "final {name} differs by {worst}");
        }
        assert!(run.join("checkpoints/step_00000004/model.safetensors").is_file());
        std::fs::remove_dir_all(run.join("checkpoints/step_00000008")).unwrap();
        let mut args: Vec<String> = vec!["--resume".into(), run.to_string_lossy().into()];
        args.extend(layout(ranks, sets));
        let out = train(&args);
        assert!(out.status.success(), "resume at {to}: {}", String::from_utf8_lossy(&out.stderr));
        assert_close(&format!("pp=2 resumed at {to}"), &want, &losses(&run));
    }
}

#[test]
fn layouts_pipelines_do_not_run_yet_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 2);
    for (ranks, sets, field) in [
        (4, &["parallel.pp=2", "parallel.tp=2"][..], "parallel.tp"),
        (4, &["parallel.pp=2", "parallel.dp=2", "parallel.zero=2"][..], "parallel.zero"),
        (2, &["parallel.pp=2", "parallel.pp_layers=[2, 3]"][..], "parallel.pp_layers"),
        (8, &["parallel.pp=8", "parallel.pp_schedule=\"gpipe\""][..], "parallel.pp"),
    ] {
        let run = dir.path().join(format!("refused-{ranks}-{}", sets.len()));
        let mut args: Vec<String> = vec![spec.to_string_lossy().into(), "--run-dir".into(), run.to_string_lossy().into()];
        args.extend(layout(ranks, sets));
        let out = train(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(field), "{sets:?}: want an error naming {field}: {err}");
        assert!(!run.join("metrics.jsonl").exists(), "{sets:?}: nothing ran");
    }
}
