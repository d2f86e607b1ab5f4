//! Checkpoints and resume: a run killed after a checkpoint and resumed repeats the uninterrupted
//! run's losses; a checkpoint written under one layout resumes under another; a damaged
//! checkpoint is refused by name and the one before it used; exports load in transformers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn gantry() -> &'static str {
    env!("CARGO_BIN_EXE_gantry")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The example GPT-2 on the example corpus, small batches, checkpoints every 10 steps.
fn spec(dir: &Path, steps: u64) -> PathBuf {
    let ex = root().join("examples");
    let path = dir.join("spec.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\npath = {:?}\ninit = \"random\"\n[data]\ntrain = {:?}\ntokenizer = {:?}\nseq_len = 32\n\
             [train]\nsteps = {steps}\nglobal_batch_size = 4\nlr = 3e-3\nwarmup_steps = 3\nseed = 11\n\
             [resources]\nthreads = 1\n[checkpoint]\nevery = 10\nkeep = 2\n",
            ex.join("tiny-gpt2/model"),
            ex.join("data/corpus.txt"),
            ex.join("data/tokenizer.json")
        ),
    )
    .unwrap();
    path
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn train(args: &[&str]) -> std::process::Output {
    let out = Command::new(gantry()).arg("train").args(args).arg("--no-progress").output().unwrap();
    assert!(out.status.success(), "gantry train {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn set(layout: (usize, u8)) -> Vec<String> {
    vec![
        "--set".into(),
        format!("resources.devices=\"cpu:{}\"", layout.0),
        "--set".into(),
        format!("parallel.dp={}", layout.0),
        "--set".into(),
        format!("parallel.zero={}", layout.1),
    ]
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_with_the_losses_of_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 60);
    let whole = dir.path().join("whole");
    train(&[spec.to_str().unwrap(), "--run-dir", whole.to_str().unwrap()]);

    let run = dir.path().join("killed");
    let mut child = Command::new(gantry())
        .arg("train")
        .arg(&spec)
        .args(["--run-dir", run.to_str().unwrap(), "--no-progress"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.join("checkpoints/step_00000020/manifest.json").is_file() {
        assert!(Instant::now() < deadline, "no checkpoint at step 20");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_before = losses(&run).len();
    assert!((20..60).contains(&done_before), "killed mid-run, after the checkpoint of step 20: {done_before} steps done");
    let out = train(&["--resume", run.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("resuming from"), "{log}");
    let (want, got) = (losses(&whole), losses(&run));
    assert_eq!(got.len(), 60, "one line per step after the resume (had {done_before} before)");
    for ((s1, a), (s2, b)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() / a <= 1e-6, "step {s1}: {b} after resuming, {a} uninterrupted");
        assert_eq!(a.to_bits(), b.to_bits(), "step {s1}: same bits on CPU with the same layout and threads");
    }
}

#[test]
fn a_checkpoint_resumes_under_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 30);
    let whole = dir.path().join("whole");
    train(&[spec.to_str().unwrap(), "--run-dir", whole.to_str().unwrap()]);
    let want = losses(&whole);
    for (from, to) in [((2usize, 3u8), (1usize, 0u8)), ((1, 0), (2, 3)), ((2, 1), (4, 2))] {
        let run = dir.path().join(format!("{from:?}-{to:?}"));
        let mut args: Vec<String> = vec![spec.to_string_lossy().into(), "--run-dir".into(), run.to_string_lossy().into()];
        args.extend(set(from));
        args.extend(["--set".into(), "train.steps=30".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        train(&refs);
        // Under ZeRO every rank wrote its own shard; under ZeRO-3 there is no gathered model.
        let ck = run.join("checkpoints/step_00000010");
        let shards: Vec<String> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("rank-"))
            .collect();
        assert_eq!(shards.len(), if from.1 >= 1 { from.0 } else { 0 }, "{from:?}: {shards:?}");
        assert_eq!(ck.join("model.safetensors").is_file(), from.1 < 3, "{from:?}");
        // The manifest covers every rank's shard (checksummed by the rank that wrote it), and the
        // ranks' checksum notes are gone.
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join("manifest.json")).unwrap()).unwrap();
        let listed: Vec<&String> = manifest["files"].as_object().unwrap().keys().collect();
        assert!(shards.iter().all(|s| listed.contains(&s)), "{listed:?}");
        assert!(!std::fs::read_dir(&ck).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".sums")));
        // Every checkpoint exports as a whole model, shards assembled.
        let out =
            Command::new(gantry()).arg("export").arg(&ck).arg("--out").arg(dir.path().join(format!("export-{from:?}"))).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Keep only the checkpoint of step 10, as if the run had died after it.
        std::fs::remove_dir_all(run.join("checkpoints/step_00000020")).unwrap();
        let mut args: Vec<String> = vec!["--resume".into(), run.to_string_lossy().into()];
        args.extend(set(to));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        train(&refs);
        let got = losses(&run);
        assert_eq!(got.len(), 30);
        for ((s, a), (_, b)) in want.iter().zip(&got) {
            assert!((a - b).abs() / a <= 1e-4, "{from:?} -> {to:?} step {s}: {b} vs {a}");
        }
    }
}

#[test]
fn a_damaged_checkpoint_is_refused_by_name_and_the_previous_one_used() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 30);
    let run = dir.path().join("run");
    train(&[spec.to_str().unwrap(), "--run-dir", run.to_str().unwrap()]);
    let newest = run.join("checkpoints/step_00000020");
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let out = train(&["--resume", run.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("skipping checkpoint {}", newest.display())), "{log}");
    assert!(log.contains("model.safetensors") && log.contains("CRC-32"), "the file and the checksum are named: {log}");
    assert!(log.contains("step_00000010 (step 10)"), "{log}");
    // A truncated optimizer state in the only checkpoint left: nothing to resume from.
    let opt = run.join("checkpoints/step_00000010/optimizer.safetensors");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&opt).unwrap().set_len(len / 2).unwrap();
    std::fs::remove_dir_all(&newest).unwrap();
    let out = Command::new(gantry()).args(["train", "--resume", run.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("optimizer.safetensors") && err.contains("no checkpoint in"), "{err}");
}

#[test]
fn a_checkpoint_that_cannot_be_written_is_skipped_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 30);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    // A file-size limit of 1 MiB stands in for a full disk: the 3.6 MB weights of a checkpoint
    // cannot be written, the metrics file can.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -f 1024; exec {} train {} --run-dir {} --no-progress", gantry(), spec.display(), run.display()))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("the checkpoint of step 10 failed") && log.contains("training goes on"), "{log}");
    assert!(log.contains("the checkpoint of step 20 failed"), "{log}");
    assert_eq!(losses(&run).len(), 30, "every step was trained: {log}");
    let left: Vec<_> =
        std::fs::read_dir(run.join("checkpoints")).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "no partial checkpoint is left behind: {left:?}");
    // The final model cannot be written either: that ends the run with an error naming the file.
    assert!(!out.status.success() && log.contains("final"), "{log}");
}

/// Under ZeRO, a checkpoint whose directory cannot be prepared (here a file sits where its
/// temporary directory goes; a full disk does the same) fails on every rank, and training goes on
/// to the next one.
#[test]
fn a_sharded_checkpoint_that_cannot_be_prepared_is_skipped_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 30);
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("checkpoints/.step_00000010.partial"), "in the way").unwrap();
    let mut args: Vec<String> = vec![spec.display().to_string(), "--run-dir".into(), run.display().to_string()];
    args.extend(set((2, 1)));
    let out = Command::new(gantry()).arg("train").args(&args).arg("--no-progress").output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("the checkpoint of step 10 failed") && log.contains("training goes on"), "{log}");
    assert_eq!(losses(&run).len(), 30, "every step was trained");
    assert!(run.join("checkpoints/step_00000020").is_dir(), "the next checkpoint was written");
    assert!(!run.join("checkpoints/step_00000010").exists());
}

/// Resuming with another seed (or batch, sequence length, data) changes which windows the
/// remaining steps see: said, not silent. Other changes (more steps) are not worth a word.
#[test]
fn resuming_with_a_different_data_order_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 20);
    let run = dir.path().join("run");
    train(&[spec.to_str().unwrap(), "--run-dir", run.to_str().unwrap()]);
    let out = train(&["--resume", run.to_str().unwrap(), "--set", "train.steps=25"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("data order"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train(&["--resume", run.to_str().unwrap(), "--set", "train.steps=30", "--set", "train.seed=99"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("different train.seed") && stderr.contains("data order"), "{stderr}");
}

fn set_layout(dp: usize, tp: usize) -> Vec<String> {
    vec![
        "--set".into(),
        format!("resources.devices=\"cpu:{}\"", dp * tp),
        "--set".into(),
        format!("parallel.dp={dp}"),
        "--set".into(),
        format!("parallel.tp={tp}"),
        // A lower rate than the other tests: gradients that are rounding noise (GPT-2's key
        // bias) take AdamW steps of about the rate, differently under each order of summation.
        "--set".into(),
        "train.lr=1e-3".into(),
    ]
}

/// A tp = 2 checkpoint resumes at tp = 1, tp = 4 and dp = 2, and a dp = 2 one at tp = 2, with the
/// losses of the uninterrupted one-device run; checkpoints and the final model hold the whole
/// model's tensors (Hugging Face's shapes), whatever the layout that wrote them.
#[test]
fn a_tensor_parallel_checkpoint_resumes_under_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 30);
    let whole = dir.path().join("whole");
    let mut args: Vec<String> = vec![spec.to_string_lossy().into(), "--run-dir".into(), whole.to_string_lossy().into()];
    args.extend(set_layout(1, 1));
    train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = losses(&whole);
    let tensors = |file: &Path| -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, t)| {
                (n, (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
            })
            .collect()
    };
    let want_final = tensors(&whole.join("final/model.safetensors"));
    // (dp, tp, ZeRO stage) before and after: under ZeRO the tp checkpoint is gathered over dp
    // and then put together over tp.
    for (from, to) in [
        ((1usize, 2usize, 0u8), (1usize, 1usize, 0u8)),
        ((1, 2, 0), (1, 4, 0)),
        ((1, 2, 0), (2, 1, 0)),
        ((2, 1, 0), (1, 2, 0)),
        ((2, 2, 3), (1, 1, 0)),
        ((1, 1, 0), (2, 2, 1)),
    ] {
        let run = dir.path().join(format!("{from:?}-{to:?}"));
        let mut args: Vec<String> = vec![spec.to_string_lossy().into(), "--run-dir".into(), run.to_string_lossy().into()];
        args.extend(set_layout(from.0, from.1));
        args.extend(["--set".into(), format!("parallel.zero={}", from.2)]);
        train(&args.iter().map(String::as_str).collect::<Vec<_>>());
        // The checkpoint and the final model hold whole tensors, as the one-device run's.
        let ck = tensors(&run.join("checkpoints/step_00000010/model.safetensors"));
        let fin = tensors(&run.join("final/model.safetensors"));
        for (name, (shape, w)) in &want_final {
            assert_eq!(&ck[name].0, shape, "{from:?}: checkpoint {name}");
            assert_eq!(&fin[name].0, shape, "{from:?}: final {name}");
            let worst = w.iter().zip(&fin[name].1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-3, "{from:?}: final {name} differs by {worst}");
        }
        std::fs::remove_dir_all(run.join("checkpoints/step_00000020")).unwrap();
        let mut args: Vec<String> = vec!["--resume".into(), run.to_string_lossy().into()];
        args.extend(set_layout(to.0, to.1));
        args.extend(["--set".into(), format!("parallel.zero={}", to.2)]);
        train(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let got = losses(&run);
        assert_eq!(got.len(), 30);
        for ((s, a), (_, b)) in want.iter().zip(&got) {
            assert!((a - b).abs() / a <= 1e-4, "{from:?} -> {to:?} step {s}: {b} vs {a}");
        }
    }
}
