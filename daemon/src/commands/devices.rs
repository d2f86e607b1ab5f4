//! `gantry devices` and `gantry kernels check`.

use anyhow::{bail, Context};
use gantry_kernels::cuda;
use serde_json::json;

use crate::cli::{DevicesArgs, KernelsArgs, KernelsCommand};

pub fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let gpus = cuda::list_gpus();
    if args.json {
        let mut v = json!({ "cpu": { "cores": cores, "devices": format!("cpu:{cores}") } });
        match &gpus {
            Ok(list) => {
                v["cuda"] = list
                    .iter()
                    .map(|g| {
                        json!({
                            "ordinal": g.ordinal,
                            "name": g.name,
                            "memory_bytes": g.total_memory_bytes,
                            "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                        })
                    })
                    .collect();
            }
            Err(e) => {
                v["cuda"] = json!([]);
                v["cuda_error"] = json!(e.to_string());
            }
        }
        println!("{v}");
        return Ok(());
    }
    match &gpus {
        Ok(list) if !list.is_empty() => {
            println!("{:<8} {:<32} {:>10} {:>8}", "DEVICE", "NAME", "MEMORY", "CAPABILITY");
            for g in list {
                let gib = g.total_memory_bytes as f64 / (1u64 << 30) as f64;
                println!(
                    "{:<8} {:<32} {:>7.1} GiB {:>8}",
                    format!("cuda:{}", g.ordinal),
                    g.name,
                    gib,
                    format!("{}.{}", g.compute_capability.0, g.compute_capability.1)
                );
            }
            let ids: Vec<String> = list.iter().map(|g| g.ordinal.to_string()).collect();
            println!("resources.devices = \"cuda:{}\" uses them all", ids.join(","));
        }
        Ok(_) => println!("no CUDA devices: the driver reports none"),
        Err(e) => println!("no CUDA devices: {e}"),
    }
    println!("{:<8} {cores} cores: resources.devices = \"cpu:N\" runs N worker processes (N up to {cores} keeps one core each)", "cpu");
    Ok(())
}

pub fn kernels(args: KernelsArgs) -> anyhow::Result<()> {
    match args.command {
        KernelsCommand::Check { arch } => check(arch),
    }
}

fn parse_arch(s: &str) -> anyhow::Result<u32> {
    let digits = s.trim().strip_prefix("sm_").unwrap_or(s.trim());
    match digits.parse::<u32>() {
        Ok(n) if (50..=200).contains(&n) => Ok(n),
        _ => bail!("--arch {s:?}: expected an architecture like sm_80 or sm_90"),
    }
}

fn check(arch: Vec<String>) -> anyhow::Result<()> {
    let archs: Vec<u32> =
        if arch.is_empty() { cuda::CHECK_ARCHS.to_vec() } else { arch.iter().map(|a| parse_arch(a)).collect::<anyhow::Result<_>>()? };
    let (major, minor) = cuda::nvrtc_version().context("gantry kernels check needs NVRTC")?;
    eprintln!(
        "NVRTC {major}.{minor}: compiling {} sources for {}",
        cuda::sources::SOURCES.len(),
        archs.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", ")
    );
    let outcomes = cuda::check_sources(&archs)?;
    let mut failed_sources: Vec<&str> = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(bytes) => eprintln!("  ok    {:<14} {:<6} {:>8} bytes  {:>5} ms", o.source, o.arch, bytes, o.millis),
            Err(e) => {
                eprintln!("  FAIL  {:<14} {:<6}\n{e}", o.source, o.arch);
                if !failed_sources.contains(&o.source) {
                    failed_sources.push(o.source);
                }
            }
        }
    }
    let total = cuda::sources::SOURCES.len();
    let compiled = total - failed_sources.len();
    println!(
        "{}",
        json!({
            "kernels": total,
            "compiled": compiled,
            "archs": archs.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>(),
            "nvrtc": format!("{major}.{minor}"),
            "failed": failed_sources,
        })
    );
    if compiled < total {
        bail!("{} of {total} kernel sources failed to compile: {}", failed_sources.len(), failed_sources.join(", "));
    }
    Ok(())
}
