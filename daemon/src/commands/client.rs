//! The CLI client of a daemon's REST API: `submit`, `jobs`, `status`, `logs`, `cancel`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use gantry_api::{ApiError, Job, JobEvent, JobPage, JobSpec, LogLine, StepMetrics};
use serde::de::DeserializeOwned;

use crate::cli::{JobArgs, JobsArgs, LogsArgs, ServerArg, SubmitArgs};
use crate::progress;
use crate::text::{clean_line, for_terminal};

struct Client {
    http: reqwest::Client,
    base: String,
}

/// The daemon could not be reached or answered 503: worth retrying.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

impl Client {
    /// A client of the daemon at `server.server`, sending GANTRY_TOKEN (if set) with every call
    /// and trusting `server.ca_cert` (if given) besides the system's certificates.
    fn new(server: &ServerArg) -> anyhow::Result<Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = std::env::var("GANTRY_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow!("GANTRY_TOKEN holds characters a header cannot carry"))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).default_headers(headers);
        if let Some(ca) = &server.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("--ca-cert {}", ca.display()))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--ca-cert {}: not PEM certificates", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Client { http: builder.build()?, base: server.server.trim_end_matches('/').to_string() })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| anyhow!(Unreachable(format!("cannot reach the daemon at {}: {e}", self.base))))?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            let message = match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => format!("{e} ({status})"),
                Err(_) => format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            };
            // 503: the daemon is up but its database is away for now.
            return Err(if status == reqwest::StatusCode::SERVICE_UNAVAILABLE { anyhow!(Unreachable(message)) } else { anyhow!(message) });
        }
        serde_json::from_slice(&body).with_context(|| format!("unexpected answer from {}", self.base))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// As `get`, riding out a daemon that restarts or a database that is briefly away (for up to
    /// two minutes): a job keeps training meanwhile, and following it should not end in an error.
    async fn get_patiently<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut said = false;
        loop {
            match self.get(path).await {
                Err(e) if e.is::<Unreachable>() && std::time::Instant::now() < deadline => {
                    if !said {
                        eprintln!("{e}; retrying");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                r => return r,
            }
        }
    }

    /// DELETE: no body comes back on success.
    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| anyhow!(Unreachable(format!("cannot reach the daemon at {}: {e}", self.base))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.bytes().await?;
        Err(match serde_json::from_slice::<ApiError>(&body) {
            Ok(e) => anyhow!("{e} ({status})"),
            Err(_) => anyhow!("{status}: {}", String::from_utf8_lossy(&body).trim()),
        })
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Option<String>) -> anyhow::Result<T> {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        self.send(req).await
    }
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f))
}

pub fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.spec).with_context(|| format!("reading {}", a.spec.display()))?;
    let mut spec = JobSpec::from_toml(&text, &a.set).map_err(|e| anyhow!("{}: {e}", a.spec.display()))?;
    // Paths in a spec are relative to the spec's file; the daemon sees them absolute.
    let base = a.spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).canonicalize()?;
    let abs = |p: &str| base.join(p).to_string_lossy().into_owned();
    spec.model.path = abs(&spec.model.path);
    spec.data.train = abs(&spec.data.train);
    spec.data.tokenizer = spec.data.tokenizer.as_deref().map(abs);
    let client = Client::new(&a.server)?;
    block_on(async {
        let job: Job = client.post("/v1/jobs", Some(serde_json::to_string(&spec)?)).await?;
        eprintln!("submitted job {} ({}), {}", job.id, job.name, job.state);
        if !a.follow {
            println!("{}", job.id);
            return Ok(());
        }
        follow(&client, job.id).await
    })?
}

/// Live progress until the job ends; the exit status says whether it succeeded. On a terminal, a
/// bar; elsewhere (a log, a CI job) a line each tenth of the run (or every 30 s, whichever comes
/// first) and one for each change of state, the final state last.
async fn follow(client: &Client, id: i64) -> anyhow::Result<()> {
    let first: Job = client.get_patiently(&format!("/v1/jobs/{id}")).await?;
    let steps = first.spec.train.steps;
    let interactive = progress::interactive();
    // `wide_msg` fits the line to the terminal: a line wider than the terminal would wrap, and
    // every redraw would leave a line behind.
    let pb = progress::bar(steps, "{prefix} step {pos}/{len} [{bar:30}] ETA {eta} {wide_msg}", interactive);
    let tenth = (steps / 10).max(1) as i64;
    let mut last_state = None;
    let mut last_printed = (0i64, std::time::Instant::now());
    let say = |line: String| if interactive { pb.println(line) } else { eprintln!("{line}") };
    loop {
        let job: Job = client.get_patiently(&format!("/v1/jobs/{id}")).await?;
        let series: serde_json::Value =
            client.get_patiently(&format!("/v1/jobs/{id}/metrics?after_step={}", (job.step.unwrap_or(0) - 1).max(0))).await?;
        let latest: Option<StepMetrics> =
            series["steps"].as_array().and_then(|a| a.last()).and_then(|v| serde_json::from_value(v.clone()).ok());
        let over = job.state.is_final();
        // A final state is told after the last step line, so the log reads in order.
        if last_state != Some(job.state) && !over {
            say(format!("job {id}: {} — {}", job.state, for_terminal(&job.reason, 500)));
            last_state = Some(job.state);
        }
        if let Some(m) = &latest {
            let msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_s);
            if interactive {
                pb.set_prefix(format!("job {id}"));
                pb.set_position(m.step as u64);
                pb.set_message(msg);
            } else {
                let (at, when) = last_printed;
                let due = m.step / tenth > at / tenth || when.elapsed() >= Duration::from_secs(30) || m.step as u64 == steps || over;
                if m.step > at && due {
                    eprintln!("job {id} step {}/{steps} {msg}", m.step);
                    last_printed = (m.step, std::time::Instant::now());
                }
            }
        }
        if over {
            pb.finish_and_clear();
            say(format!("job {id}: {} — {}", job.state, for_terminal(&job.reason, 2000)));
            println!("{}", serde_json::json!({"id": id, "state": job.state, "reason": job.reason, "step": job.step}));
            if job.state != gantry_api::JobState::Succeeded {
                bail!("job {id} {}: {}", job.state, for_terminal(&job.reason, 2000));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

pub fn jobs(a: JobsArgs) -> anyhow::Result<()> {
    let client = Client::new(&a.server)?;
    let mut path = format!("/v1/jobs?limit={}", a.limit);
    if let Some(s) = &a.state {
        path.push_str(&format!("&state={s}"));
    }
    let page: JobPage = block_on(client.get(&path))??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    let now = crate::store::now_ms();
    let rows: Vec<Vec<String>> = page
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                for_terminal(&j.name, 32),
                for_terminal(j.owner.as_deref().unwrap_or("-"), 24),
                j.state.to_string(),
                format!("{}/{}", j.step.unwrap_or(0), j.spec.train.steps),
                devices(j),
                age(now - j.created_ms),
                for_terminal(&j.reason, 200),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "OWNER", "STATE", "STEP", "DEVICES", "AGE", "REASON"], &rows);
    if let Some(after) = page.next_after {
        eprintln!("(more: --limit or GET /v1/jobs?after={after})");
    }
    Ok(())
}

pub fn status(a: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&a.server)?;
    let (job, events): (Job, serde_json::Value) = block_on(async {
        let job: Job = client.get(&format!("/v1/jobs/{}", a.id)).await?;
        let ev: serde_json::Value = client.get(&format!("/v1/jobs/{}/events", a.id)).await?;
        anyhow::Ok((job, ev))
    })??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"job": job, "events": events["events"]}))?);
        return Ok(());
    }
    let events: Vec<JobEvent> = serde_json::from_value(events["events"].clone())?;
    println!("job {}  {}", job.id, for_terminal(&job.name, 300));
    println!("  owner       {}", job.owner.as_deref().map_or("-".into(), |o| for_terminal(o, 100)));
    println!("  state       {}", job.state);
    println!("  reason      {}", for_terminal(&job.reason, 2000));
    println!("  progress    step {} of {}", job.step.unwrap_or(0), job.spec.train.steps);
    println!(
        "  devices     {} ({})",
        requested(&job.spec.resources.devices),
        if job.placement.is_empty() { "none held".into() } else { job.placement.join(", ") }
    );
    println!("  restarts    {} of {}", job.restarts, job.spec.restart.max_restarts);
    println!("  checkpoint  {}", job.checkpoint_step.map_or("none".into(), |s| format!("step {s}")));
    println!("  run dir     {}", for_terminal(&job.run_dir, 4200));
    if let Some(m) = &job.memory_estimate {
        use gantry_engine::train::human_bytes;
        println!(
            "  memory      about {} a rank (parameters {}, gradients {}, optimizer {}, activations {}, other {})",
            human_bytes(m.per_rank),
            human_bytes(m.parameters),
            human_bytes(m.gradients),
            human_bytes(m.optimizer),
            human_bytes(m.activations),
            human_bytes(m.other)
        );
    }
    println!("events:");
    let t0 = events.first().map_or(0, |e| e.at_ms);
    for e in events {
        let from = e.from.map_or("-".to_string(), |f| f.to_string());
        println!("  +{:>8.1}s  {from:>10} → {:<10} {}", (e.at_ms - t0) as f64 / 1e3, e.to.to_string(), for_terminal(&e.reason, 2000));
    }
    Ok(())
}

pub fn cancel(a: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&a.server)?;
    let job: Job = block_on(client.post(&format!("/v1/jobs/{}/cancel", a.id), None))??;
    eprintln!("job {} {}", job.id, job.state);
    Ok(())
}

pub fn delete(a: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&a.server)?;
    block_on(client.delete(&format!("/v1/jobs/{}", a.id)))??;
    eprintln!("job {} deleted, with its run directory", a.id);
    Ok(())
}

pub fn logs(a: LogsArgs) -> anyhow::Result<()> {
    let client = Client::new(&a.server)?;
    let rank = a.rank.map_or(String::new(), |r| format!("&rank={r}"));
    block_on(async {
        if !a.follow {
            // Page through each rank on its own: `after` is a byte offset within one rank's log.
            let ranks: Vec<u32> = match a.rank {
                Some(r) => vec![r],
                None => (0..client.get::<Job>(&format!("/v1/jobs/{}", a.id)).await?.devices.max(1)).collect(),
            };
            const PAGE: usize = 10_000;
            for r in ranks {
                let mut after = -1i64;
                loop {
                    let v: serde_json::Value = client.get(&format!("/v1/jobs/{}/logs?rank={r}&after={after}&limit={PAGE}", a.id)).await?;
                    let lines: Vec<LogLine> = serde_json::from_value(v["lines"].clone())?;
                    for l in &lines {
                        print_line(l, a.rank.is_none());
                    }
                    // A page may end early (it is bounded in bytes too): on until one is empty.
                    match lines.last() {
                        Some(l) => after = l.offset,
                        None => break,
                    }
                }
            }
            return Ok(());
        }
        // The stream can end before the job does (the daemon restarted, the network dropped):
        // reconnect for up to two minutes, and print each line once, by its offset in its rank's
        // log, which the daemon keeps stable across restarts.
        let mut printed: BTreeMap<u32, i64> = BTreeMap::new();
        let mut away_since: Option<std::time::Instant> = None;
        loop {
            let after = a.rank.and_then(|r| printed.get(&r)).copied().unwrap_or(-1);
            let url = format!("{}/v1/jobs/{}/logs?follow=true&after={after}{rank}", client.base, a.id);
            let mut connected = false;
            let error = match follow_logs_once(&client, &url, &mut printed, a.rank.is_none(), &mut connected).await {
                Ok(true) => return Ok(()),
                Ok(false) => anyhow!(Unreachable(format!("the log stream from {} ended before the job did", client.base))),
                Err(e) => e,
            };
            if !error.is::<Unreachable>() {
                return Err(error);
            }
            // Two minutes from the last time the stream was up.
            if connected {
                away_since = None;
            }
            if away_since.is_none() {
                eprintln!("{error}; reconnecting");
            }
            let since = *away_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_secs(120) {
                return Err(error.context("gave up following the logs after two minutes"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })?
}

/// Follows the log stream once: prints the lines not yet printed (by rank and offset) and
/// returns whether the stream ended because the job is over. `Unreachable` when the daemon
/// could not be reached or the stream broke; `connected` is set once the daemon answered.
async fn follow_logs_once(
    client: &Client,
    url: &str,
    printed: &mut BTreeMap<u32, i64>,
    with_rank: bool,
    connected: &mut bool,
) -> anyhow::Result<bool> {
    let resp =
        client.http.get(url).send().await.map_err(|e| anyhow!(Unreachable(format!("cannot reach the daemon at {}: {e}", client.base))))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&body).map(|e| e.to_string()).unwrap_or(format!("{status}: {body}"));
        return Err(if status == reqwest::StatusCode::SERVICE_UNAVAILABLE { anyhow!(Unreachable(message)) } else { anyhow!(message) });
    }
    *connected = true;
    let mut stream = resp.bytes_stream();
    // Bytes until a whole event is in: a character may be split across network chunks.
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow!(Unreachable(format!("the log stream from {} broke: {e}", client.base))))?;
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&raw);
            let kind = event.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim);
            let data = event.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim).unwrap_or("");
            match kind {
                Some("log") => {
                    let line: LogLine = serde_json::from_str(data)?;
                    let last = printed.entry(line.rank).or_insert(-1);
                    if line.offset > *last {
                        *last = line.offset;
                        print_line(&line, with_rank);
                    }
                }
                Some("end") => return Ok(true),
                _ => {}
            }
        }
    }
    Ok(false)
}

/// Prints a stored log line, escape sequences and other control characters made harmless
/// (lines stored by an older daemon may hold them).
fn print_line(l: &LogLine, with_rank: bool) {
    let line = clean_line(&l.line);
    if with_rank {
        println!("[rank {}] {line}", l.rank);
    } else {
        println!("{line}");
    }
}

/// The slots a job holds (`cpu:0, cpu:1`), or while it holds none what it asks for (`2 cpu`): a
/// request must not read like a slot's name.
fn devices(j: &Job) -> String {
    if j.placement.is_empty() {
        requested(&j.spec.resources.devices)
    } else {
        j.placement.join(",")
    }
}

/// What a job asks for (`2 cpu`, `1 gpu`).
fn requested(devices: &gantry_api::Devices) -> String {
    match devices {
        gantry_api::Devices::Cpu(n) => format!("{n} cpu"),
        gantry_api::Devices::Cuda(ids) => format!("{} gpu", ids.len()),
    }
}

fn age(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Columns padded to their widest cell; the last column is not padded. (Padded by hand: a
/// format width is limited to 65,535, and a cell must never make the table panic.)
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(
                |(i, c)| if i + 1 == n { c.to_string() } else { format!("{c}{}", " ".repeat(widths[i].saturating_sub(c.chars().count()))) },
            )
            .collect();
        println!("{}", parts.join("  "));
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell wider than a format width may be (65,535) made `gantry jobs` panic for every user.
    #[test]
    fn a_table_with_an_enormous_cell_prints_without_panicking() {
        let rows = vec![vec!["1".to_string(), "x".repeat(70_000), "queued".to_string()], vec!["2".into(), "b".into(), "ok".into()]];
        print_table(&["ID", "NAME", "STATE"], &rows);
        assert_eq!(for_terminal(&"x".repeat(70_000), 32).chars().count(), 32);
    }
}
