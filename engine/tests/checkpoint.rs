//! Bad Hugging Face directories are refused with errors that name the file and the tensor, and
//! export round-trips through the loader.

use std::path::{Path, PathBuf};

use gantry_engine::checkpoint::save_hf_dir;
use gantry_engine::config::ModelInit;
use gantry_engine::train::load_model;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).join("model")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    load_model(dir, ModelInit::Pretrained, 0).unwrap_err().to_string()
}

#[test]
fn truncated_weights_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_tied"), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn a_missing_shard_names_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), tmp.path());
    std::fs::remove_file(tmp.path().join("model-00003-of-00007.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model-00003-of-00007.safetensors"), "{e}");
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gpt2"), tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap().replace("\"n_layer\": 2", "\"n_layer\": 3");
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("missing") && e.contains("transformer.h.2.ln_1.weight"), "{e}");
    let cfg = std::fs::read_to_string(tmp.path().join("config.json"))
        .unwrap()
        .replace("\"n_layer\": 3", "\"n_layer\": 2")
        .replace("\"vocab_size\": 96", "\"vocab_size\": 97");
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("transformer.wte.weight") && e.contains("[96, 32]"), "{e}");
}

#[test]
fn export_then_load_gives_the_same_parameters() {
    let (model, params) = load_model(&fixture("llama_gqa"), ModelInit::Pretrained, 0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_hf_dir(tmp.path(), &model.config, &model.table, &params, None).unwrap();
    let (again, reloaded) = load_model(tmp.path(), ModelInit::Pretrained, 0).unwrap();
    assert_eq!(again.config.rope_theta, model.config.rope_theta);
    assert_eq!(params, reloaded, "export and reload must be bit-exact");
    let names: Vec<&str> = again.table.entries().iter().map(|e| e.name.as_str()).collect();
    assert!(names.contains(&"model.layers.1.self_attn.k_proj.weight") && names.contains(&"lm_head.weight"));
}
