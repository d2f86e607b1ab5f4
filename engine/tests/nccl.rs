//! The NCCL backend against the expected results (feature `cuda`; needs GPUs and NCCL). One rank
//! runs on any GPU machine; several ranks (one thread and one GPU each) run where the machine has
//! several GPUs, since NCCL refuses two ranks on one device. Without a GPU each test says it was
//! skipped and passes, unless `GANTRY_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

mod common;

use common::{gpu_count, rendezvous};

use std::time::Duration;

use gantry_engine::comm::{shard_range, Axis, Comm, DeviceMesh, NcclComm, ReduceOp};
use gantry_kernels::cuda::Gpu;

/// Rank r's input: distinct per rank and element, exact in f32 when summed.
fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13) % 101) as f32).collect()
}

/// Runs every collective on `world` ranks (rank r on GPU r) and checks each result.
fn run_world(world: usize) {
    let rv = rendezvous();
    let n = 1001; // divides into no number of ranks above 1 evenly: uneven shards
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let rv = rv.clone();
            std::thread::spawn(move || {
                let gpu = Gpu::open(rank).unwrap();
                let mut tcp = Comm::connect(rank, world, &rv, Duration::from_secs(60)).unwrap();
                let mut nc = NcclComm::connect(&mut tcp, &gpu, Duration::from_secs(60)).unwrap();
                let s = gpu.stream().clone();
                let sum: Vec<f32> = (0..n).map(|i| (0..world).map(|r| input(r, n)[i]).sum()).collect();

                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                nc.all_reduce(&mut d, ReduceOp::Sum).unwrap();
                assert_eq!(s.clone_dtoh(&d).unwrap(), sum, "all_reduce sum");

                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                nc.all_reduce(&mut d, ReduceOp::Avg).unwrap();
                let avg: Vec<f32> = sum.iter().map(|v| v / world as f32).collect();
                let got = s.clone_dtoh(&d).unwrap();
                assert!(got.iter().zip(&avg).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)), "all_reduce avg");

                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                let mine = nc.reduce_scatter(&mut d).unwrap();
                assert_eq!(mine, shard_range(n, world, rank));
                assert_eq!(&s.clone_dtoh(&d).unwrap()[mine.clone()], &sum[mine.clone()], "reduce_scatter shard");

                nc.all_gather(&mut d).unwrap();
                assert_eq!(s.clone_dtoh(&d).unwrap(), sum, "all_gather after reduce_scatter = all_reduce");

                // Deferred, as a trainer overlaps backward: chunks handed over one at a time while
                // the compute stream goes on writing the rest of the buffer (here: the second half,
                // written after the first half's all-reduce was queued) are summed as a whole
                // all-reduce would, once `wait_deferred` returns.
                let half = n / 2;
                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                nc.defer(&s).unwrap();
                nc.all_reduce(&mut d.slice_mut(..half), ReduceOp::Sum).unwrap();
                s.memcpy_htod(&input(rank, n)[half..], &mut d.slice_mut(half..)).unwrap();
                nc.all_reduce(&mut d.slice_mut(half..), ReduceOp::Sum).unwrap();
                assert_eq!(nc.wait_deferred().unwrap(), 2, "two collectives were queued");
                assert_eq!(s.clone_dtoh(&d).unwrap(), sum, "deferred all_reduce of two halves");
                assert_eq!(nc.wait_deferred().unwrap(), 0, "and nothing is deferred after");

                // Chunk by chunk, as the data-parallel trainer shards its gradients: each chunk
                // is split into its own (uneven, sometimes empty) shards.
                let chunks = [0..10, 10..10, 10..517, 517..n];
                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                nc.reduce_scatter_chunks(&mut d, &chunks).unwrap();
                let got = s.clone_dtoh(&d).unwrap();
                for c in &chunks {
                    let r = shard_range(c.len(), world, rank);
                    let r = c.start + r.start..c.start + r.end;
                    assert_eq!(&got[r.clone()], &sum[r.clone()], "reduce_scatter_chunks {r:?}");
                }
                nc.all_gather_chunks(&mut d, &chunks).unwrap();
                assert_eq!(s.clone_dtoh(&d).unwrap(), sum, "all_gather_chunks after reduce_scatter_chunks = all_reduce");
                let err = nc.all_gather_chunks(&mut d, std::slice::from_ref(&(0..n + 1))).unwrap_err().to_string();
                assert!(err.contains("outside the 1001 elements"), "{err}");

                // A mesh axis as a communicator of its own: pairs of ranks (or the world of one).
                let mesh = if world.is_multiple_of(2) {
                    DeviceMesh::new(world, world / 2, 1, 1, 2)
                } else {
                    DeviceMesh::new(world, world, 1, 1, 1)
                };
                let group = mesh.unwrap().group(if world.is_multiple_of(2) { Axis::Tp } else { Axis::Dp }, rank);
                let mut sub = nc.split(&group).unwrap();
                assert_eq!((sub.rank(), sub.world()), (group.me, group.size()));
                let mut d = s.clone_htod(&input(rank, n)).unwrap();
                sub.all_reduce(&mut d, ReduceOp::Sum).unwrap();
                let group_sum: Vec<f32> = (0..n).map(|i| group.ranks.iter().map(|&r| input(r, n)[i]).sum()).collect();
                assert_eq!(s.clone_dtoh(&d).unwrap(), group_sum, "all_reduce in a sub-group");

                let mut bytes = s.clone_htod(&vec![rank as u8; 300]).unwrap();
                nc.broadcast(&mut bytes, world - 1).unwrap();
                assert_eq!(s.clone_dtoh(&bytes).unwrap(), vec![(world - 1) as u8; 300], "broadcast");

                let b = 5;
                let send: Vec<f32> = (0..world * b).map(|i| (rank * 1000 + i) as f32).collect();
                let mut recv = s.alloc_zeros::<f32>(world * b).unwrap();
                nc.all_to_all(&s.clone_htod(&send).unwrap(), &mut recv).unwrap();
                let want: Vec<f32> = (0..world).flat_map(|from| (0..b).map(move |k| (from * 1000 + rank * b + k) as f32)).collect();
                assert_eq!(s.clone_dtoh(&recv).unwrap(), want, "all_to_all");

                if world > 1 {
                    // A ring of sends: even ranks send first, odd ranks receive first.
                    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
                    let out = s.clone_htod(&vec![rank as u8 + 1; 64]).unwrap();
                    let mut inb = s.alloc_zeros::<u8>(64).unwrap();
                    if rank % 2 == 0 {
                        nc.send(next, &out).unwrap();
                        nc.recv(prev, &mut inb).unwrap();
                    } else {
                        nc.recv(prev, &mut inb).unwrap();
                        nc.send(next, &out).unwrap();
                    }
                    assert_eq!(s.clone_dtoh(&inb).unwrap(), vec![prev as u8 + 1; 64], "send/recv");
                }
                nc.barrier().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a rank failed");
    }
}

#[test]
fn one_rank_runs_every_collective() {
    if gpu_count().is_none() {
        return;
    }
    run_world(1);
}

#[test]
fn every_gpu_as_a_rank_gives_the_expected_results() {
    let Some(n) = gpu_count() else { return };
    if n < 2 {
        eprintln!("skipped: {n} GPU; several NCCL ranks need several GPUs");
        return;
    }
    run_world(n);
}
