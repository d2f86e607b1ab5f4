//! Open-loop HTTP load at a fixed rate, for the daemon's latency benchmark (`bench/api/run.sh`).
//!
//! Requests start on a fixed schedule whether or not earlier ones have answered, and each latency
//! is measured from the request's scheduled start, so a slow server cannot hide its queueing by
//! slowing the load down (no coordinated omission).
//!
//! Usage: api_load URL RATE SECONDS PATH [PATH...]; a `{id}` in a path becomes a random job id in
//! 1..=$MAX_ID (default 10000). Prints a table and, last, a JSON line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 4, "usage: api_load URL RATE SECONDS PATH [PATH...]");
    let (url, rate, secs) = (args[0].trim_end_matches('/').to_string(), args[1].parse::<f64>()?, args[2].parse::<f64>()?);
    let paths: Vec<String> = args[3..].to_vec();
    let max_id: u64 = std::env::var("MAX_ID").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let total = (rate * secs) as usize;
        let start = Instant::now() + Duration::from_millis(200);
        let mut tasks = Vec::with_capacity(total);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let template = &paths[i % paths.len()];
            let path = template.replace("{id}", &(1 + rng % max_id).to_string());
            let (client, url, template) = (client.clone(), url.clone(), template.clone());
            tasks.push(tokio::spawn(async move {
                let ok = match client.get(format!("{url}{path}")).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                (template, due.elapsed(), ok)
            }));
        }
        let elapsed = start.elapsed();
        let mut by_path: BTreeMap<String, (Vec<Duration>, usize)> = BTreeMap::new();
        for t in tasks {
            let (path, latency, ok) = t.await?;
            let e = by_path.entry(path).or_default();
            e.0.push(latency);
            e.1 += usize::from(!ok);
        }
        let mut report = serde_json::Map::new();
        println!("{:<32} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}", "path", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms");
        for (path, (mut lat, errors)) in by_path {
            lat.sort();
            let q = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1].as_secs_f64() * 1e3;
            println!("{path:<32} {:>8} {errors:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", lat.len(), q(0.5), q(0.9), q(0.99), q(1.0));
            report.insert(path, serde_json::json!({"requests": lat.len(), "errors": errors, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": q(1.0)}));
        }
        let achieved = total as f64 / elapsed.as_secs_f64();
        println!("{}", serde_json::json!({"rate": rate, "achieved_rate": achieved, "seconds": secs, "paths": report}));
        anyhow::Ok(())
    })
}
