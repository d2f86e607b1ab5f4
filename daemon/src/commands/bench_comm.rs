//! `gantry bench comm`: bus bandwidth of each collective across message sizes, between local
//! processes (over the transport training uses: Unix sockets between ranks on one machine, or
//! TCP with `--transport tcp`), beside a plain TCP stream between ranks 0 and 1 measured in the
//! same run.
//!
//! Bus bandwidth follows NCCL's convention, so figures compare across world sizes: all-reduce
//! moves `2(n-1)/n` of the buffer per rank, reduce-scatter, all-gather and all-to-all `(n-1)/n`,
//! broadcast all of it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gantry_engine::comm::{Comm, ReduceOp, Transport};
use serde_json::json;

use crate::cli::CommBenchArgs;

const STREAM_BYTES: usize = 256 << 20;

pub fn run(a: CommBenchArgs) -> anyhow::Result<()> {
    if a.world < 2 {
        bail!("--world must be at least 2");
    }
    if !matches!(a.transport.as_str(), "auto" | "tcp") {
        bail!("--transport {:?}: expected auto or tcp", a.transport);
    }
    match (a.rank, &a.rendezvous) {
        (Some(rank), Some(rv)) => rank_main(&a, rank, rv).map(|_| ()),
        _ => launch(&a),
    }
}

/// Starts ranks 1.. as child processes and runs rank 0 here.
fn launch(a: &CommBenchArgs) -> anyhow::Result<()> {
    let rv = format!("127.0.0.1:{}", TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 1..a.world {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "comm", "--world", &a.world.to_string(), "--iters", &a.iters.to_string(), "--transport", &a.transport])
            .args(["--rank", &rank.to_string(), "--rendezvous", &rv])
            .stdout(Stdio::null());
        if !a.sizes.is_empty() {
            let sizes: Vec<String> = a.sizes.iter().map(|s| s.to_string()).collect();
            cmd.args(["--sizes", &sizes.join(",")]);
        }
        children.push(cmd.spawn().context("starting a rank")?);
    }
    let result = rank_main(a, 0, &rv);
    for mut c in children {
        if result.is_err() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    let report = result?;
    println!("{report}");
    Ok(())
}

fn sizes(a: &CommBenchArgs) -> Vec<usize> {
    if a.sizes.is_empty() {
        (0..).map(|k| 4096usize << (2 * k)).take_while(|s| *s <= 256 << 20).collect()
    } else {
        a.sizes.clone()
    }
}

fn rank_main(a: &CommBenchArgs, rank: usize, rv: &str) -> anyhow::Result<serde_json::Value> {
    let transport = if a.transport == "tcp" { Transport::Tcp } else { Transport::Auto };
    let mut comm = Comm::connect_with(rank, a.world, rv, Duration::from_secs(60), transport)?;
    let links = comm.transports();
    let g = comm.world_group();
    let n = a.world as f64;
    // A plain TCP stream from rank 0 to rank 1, set up through the collectives' own links.
    // The baselines vary run to run (where the kernel places the processes on two cores):
    // take the best of three, so the fractions below are conservative.
    let (mut stream_bps, mut duplex_bps) = (0f64, 0f64);
    if rank < 2 {
        for _ in 0..3 {
            stream_bps = stream_bps.max(plain_stream(&mut comm, rank)?);
            duplex_bps = duplex_bps.max(duplex_stream(&mut comm, rank)?);
        }
    }
    comm.barrier(&g)?;
    let mut results = Vec::new();
    if rank == 0 {
        eprintln!("plain TCP stream rank 0 → 1: {:.2} GB/s ({} MiB, best of 3)", stream_bps / 1e9, STREAM_BYTES >> 20);
        eprintln!("plain TCP streams both ways at once: {:.2} GB/s each way (best of 3)", duplex_bps / 1e9);
        eprintln!(
            "collectives over: {}",
            links
                .iter()
                .filter(|k| **k != "self")
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!("{:<15} {:>12} {:>12} {:>12} {:>12}", "collective", "bytes", "time us", "algbw GB/s", "busbw GB/s");
    }
    for size in sizes(a) {
        let len = (size / 4).max(a.world);
        let mut buf: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
        let mut bytes = vec![0u8; len * 4];
        let mut recv = vec![0f32; len - len % a.world];
        let send = recv.clone();
        let ops: [(&str, f64); 5] = [
            ("all_reduce", 2.0 * (n - 1.0) / n),
            ("reduce_scatter", (n - 1.0) / n),
            ("all_gather", (n - 1.0) / n),
            ("broadcast", 1.0),
            ("all_to_all", (n - 1.0) / n),
        ];
        for (name, factor) in ops {
            let mut times = Vec::new();
            for it in 0..=a.iters {
                comm.barrier(&g)?;
                let start = Instant::now();
                match name {
                    "all_reduce" => comm.all_reduce(&g, &mut buf, ReduceOp::Sum)?,
                    "reduce_scatter" => {
                        comm.reduce_scatter(&g, &mut buf)?;
                    }
                    "all_gather" => comm.all_gather(&g, &mut buf)?,
                    "broadcast" => comm.broadcast(&g, &mut bytes, 0)?,
                    _ => comm.all_to_all(&g, &send, &mut recv)?,
                }
                // The slowest rank decides: agree on the time through a barrier.
                comm.barrier(&g)?;
                if it > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
                if name == "all_reduce" {
                    buf.iter_mut().for_each(|x| *x = 1.0);
                }
            }
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let moved = if name == "all_to_all" { (recv.len() * 4) as f64 } else { (len * 4) as f64 };
            let algbw = moved / t;
            if rank == 0 {
                eprintln!("{name:<15} {:>12} {:>12.1} {:>12.3} {:>12.3}", len * 4, t * 1e6, algbw / 1e9, algbw * factor / 1e9);
            }
            results.push(
                json!({"op": name, "bytes": len * 4, "time_us": t * 1e6, "algbw_bytes_per_s": algbw, "busbw_bytes_per_s": algbw * factor}),
            );
        }
    }
    let at_64 = results
        .iter()
        .find(|r| r["op"] == "all_reduce" && r["bytes"] == 64 << 20)
        .map(|r| r["busbw_bytes_per_s"].as_f64().unwrap_or(0.0) / stream_bps);
    let at_64_duplex = at_64.map(|f| f * stream_bps / duplex_bps);
    if let (0, Some(f), Some(d)) = (rank, at_64, at_64_duplex) {
        eprintln!(
            "all-reduce at 64 MiB: bus bandwidth {:.0}% of the plain TCP stream, {:.0}% of the two-way streams",
            100.0 * f,
            100.0 * d
        );
    }
    Ok(json!({
        "world": a.world,
        "transport": links.get(1).copied().unwrap_or("self"),
        "tcp_stream_bytes_per_s": stream_bps,
        "tcp_duplex_bytes_per_s_each_way": duplex_bps,
        "allreduce_64mib_fraction_of_tcp_stream": at_64,
        "allreduce_64mib_fraction_of_tcp_duplex": at_64_duplex,
        "results": results
    }))
}

/// Ranks 0 and 1 stream `STREAM_BYTES` to each other at the same time (what a ring step of two
/// ranks does); returns the slower direction's rate, as both ranks see it.
fn duplex_stream(comm: &mut Comm, rank: usize) -> anyhow::Result<f64> {
    let pair = comm.group(&[0, 1])?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = (l.local_addr()?.port() as u32).to_le_bytes();
    let mut theirs = [0u8; 4];
    if rank == 0 {
        comm.send(&pair, 1, &port)?;
        comm.recv(&pair, 1, &mut theirs)?;
    } else {
        comm.recv(&pair, 0, &mut theirs)?;
        comm.send(&pair, 0, &port)?;
    }
    let out = TcpStream::connect(("127.0.0.1", u32::from_le_bytes(theirs) as u16))?;
    let (inc, _) = l.accept()?;
    comm.barrier(&pair)?;
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut out = out;
        let buf = vec![7u8; 4 << 20];
        for _ in 0..STREAM_BYTES / buf.len() {
            out.write_all(&buf)?;
        }
        Ok(())
    });
    let mut inc = inc;
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0;
    while got < STREAM_BYTES {
        let n = inc.read(&mut buf)?;
        if n == 0 {
            bail!("the stream ended early");
        }
        got += n;
    }
    writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let mine = got as f64 / start.elapsed().as_secs_f64();
    let mut all = [mine];
    comm.all_reduce_f64(&pair, &mut all)?;
    // The sum of both ranks' receive rates, halved: the mean rate each way.
    Ok(all[0] / 2.0)
}

/// Rank 0 streams `STREAM_BYTES` to rank 1 over a fresh blocking connection; returns the rate
/// rank 1 saw (rank 0 learns it back).
fn plain_stream(comm: &mut Comm, rank: usize) -> anyhow::Result<f64> {
    let pair = comm.group(&[0, 1])?;
    if rank == 1 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = (l.local_addr()?.port() as u32).to_le_bytes();
        comm.send(&pair, 0, &port)?;
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        let mut start = None;
        while got < STREAM_BYTES {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("the stream ended early");
            }
            start.get_or_insert_with(Instant::now);
            got += n;
        }
        let rate = got as f64 / start.map_or(1e-9, |s: Instant| s.elapsed().as_secs_f64());
        comm.send(&pair, 0, &rate.to_le_bytes())?;
        Ok(rate)
    } else {
        let mut port = [0u8; 4];
        comm.recv(&pair, 1, &mut port)?;
        let mut s = TcpStream::connect(("127.0.0.1", u32::from_le_bytes(port) as u16))?;
        let buf = vec![7u8; 4 << 20];
        for _ in 0..STREAM_BYTES / buf.len() {
            s.write_all(&buf)?;
        }
        drop(s);
        let mut rate = [0u8; 8];
        comm.recv(&pair, 1, &mut rate)?;
        Ok(f64::from_le_bytes(rate))
    }
}
