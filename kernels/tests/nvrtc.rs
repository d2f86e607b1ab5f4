//! Every kernel source compiles through NVRTC for every checked architecture, and defines every
//! kernel the host launchers look up. Needs only NVRTC (`pip install nvidia-cuda-nvrtc`), no GPU;
//! where NVRTC cannot be found the test says so and passes, unless `GANTRY_REQUIRE_NVRTC=1`
//! (CI sets it, so there a missing NVRTC fails).
#![cfg(feature = "cuda")]

use gantry_kernels::cuda::{self, nvrtc, sources};

fn nvrtc_or_skip() -> bool {
    match nvrtc::ensure_loaded() {
        Ok(()) => true,
        Err(e) if std::env::var("GANTRY_REQUIRE_NVRTC").as_deref() != Ok("1") => {
            eprintln!("skipped: {e}");
            false
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn every_source_compiles_for_every_checked_arch() {
    if !nvrtc_or_skip() {
        return;
    }
    let outcomes = cuda::check_sources(cuda::CHECK_ARCHS).unwrap();
    assert_eq!(outcomes.len(), sources::SOURCES.len() * cuda::CHECK_ARCHS.len());
    let failed: Vec<String> =
        outcomes.iter().filter_map(|o| o.result.as_ref().err().map(|e| format!("{} {}: {e}", o.source, o.arch))).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    for o in &outcomes {
        assert!(*o.result.as_ref().unwrap() > 1024, "{} {}: CUBIN suspiciously small", o.source, o.arch);
    }
}

/// The names `cuda::ops` looks up, per source.
fn launched() -> Vec<(&'static str, String)> {
    let mut names = Vec::new();
    for t in ["f32", "bf16", "f16"] {
        for k in ["gelu_fwd", "gelu_bwd", "swiglu_fwd", "swiglu_bwd", "add_bias", "accumulate"] {
            names.push(("elementwise", format!("{k}_{t}")));
        }
        if t != "f32" {
            names.push(("elementwise", format!("cast_f32_to_{t}")));
            names.push(("elementwise", format!("cast_{t}_to_f32")));
        }
        for k in [
            "layernorm_fwd",
            "layernorm_bwd_dx",
            "layernorm_bwd_dwdb",
            "rmsnorm_fwd",
            "rmsnorm_bwd_dx",
            "rmsnorm_bwd_dw",
            "col_sums_partial",
        ] {
            names.push(("norm", format!("{k}_{t}")));
        }
        names.push(("rope", format!("rope_{t}")));
        for k in ["embedding_fwd", "embedding_rows", "add_positions", "embedding_bwd_wte", "embedding_bwd_wpe"] {
            names.push(("embedding", format!("{k}_{t}")));
        }
        for k in ["softmax_xent", "xent_stats", "xent_finish"] {
            names.push(("cross_entropy", format!("{k}_{t}")));
        }
        for k in ["attention_fwd", "attention_bwd_delta", "attention_bwd_dq", "attention_bwd_dkv"] {
            names.push(("attention", format!("{k}_{t}")));
        }
    }
    for k in ["scale_f32", "sum_squares_partial_f32", "unscale_check_f32"] {
        names.push(("elementwise", k.to_string()));
    }
    names.push(("norm", "col_sum_parts_f32".to_string()));
    for k in ["adamw_f32", "adamw_copy_bf16", "adamw_copy_f16"] {
        names.push(("adamw", k.to_string()));
    }
    names
}

#[test]
fn every_launched_kernel_is_defined() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut missing = Vec::new();
    for src in sources::SOURCES {
        let entries = nvrtc::entry_points(src, nvrtc::Arch(80)).unwrap();
        for (s, name) in launched().iter().filter(|(s, _)| *s == src.name) {
            if !entries.contains(name) {
                missing.push(format!("{s}.cu: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "kernels the launchers use but the sources do not define: {missing:?}");
}

#[test]
fn a_broken_source_is_reported_with_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let bad = sources::KernelSource { name: "broken", code: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n" };
    let err = nvrtc::compile(&bad, nvrtc::Arch(90)).unwrap_err().to_string();
    assert!(err.contains("broken.cu") && err.contains("sm_90") && err.contains("undefined_name"), "{err}");
}
