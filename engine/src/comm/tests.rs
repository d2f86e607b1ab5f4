//! Collectives between threads of this process, each a rank with real connections (Unix-domain
//! sockets, the transport ranks on one machine use; one test runs them over TCP too).

use std::time::{Duration, Instant};

use super::*;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Runs `f(comm)` on `world` ranks (threads) and returns their results in rank order.
fn on_ranks<T: Send + 'static>(world: usize, timeout: Duration, f: impl Fn(Comm) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    let addr = free_addr();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let (addr, f) = (addr.clone(), f.clone());
            std::thread::spawn(move || f(Comm::connect(r, world, &addr, timeout).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn data(rank: usize, len: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ (rank as u64 * 0x1234_5678);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn all_reduce_matches_a_scalar_sum_and_every_rank_has_the_same_bits() {
    for world in [2, 3, 4] {
        // Small (direct exchange), ring with uneven segments, and several MiB.
        for len in [1, 1000, 16_385, 1_000_003] {
            let out = on_ranks(world, Duration::from_secs(20), move |mut c| {
                let mut d = data(c.rank(), len);
                c.all_reduce(&c.world_group(), &mut d, ReduceOp::Sum).unwrap();
                d
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
            for i in (0..len).step_by(997) {
                let want: f64 = inputs.iter().map(|d| d[i] as f64).sum();
                assert!((out[0][i] as f64 - want).abs() < 1e-5, "world {world} len {len} [{i}]: {} vs {want}", out[0][i]);
            }
            for r in 1..world {
                assert!(out[r].iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {r} differs (world {world}, len {len})");
            }
        }
    }
    let avg = on_ranks(4, Duration::from_secs(10), |mut c| {
        let mut d = vec![c.rank() as f32; 100_000];
        c.all_reduce(&c.world_group(), &mut d, ReduceOp::Avg).unwrap();
        d[77]
    });
    assert_eq!(avg, vec![1.5; 4]);
}

#[test]
fn reduce_scatter_leaves_each_rank_its_summed_shard_and_all_gather_restores_the_whole() {
    let world = 3;
    let len = 100_001;
    let out = on_ranks(world, Duration::from_secs(10), move |mut c| {
        let g = c.world_group();
        let mut d = data(c.rank(), len);
        let shard = c.reduce_scatter(&g, &mut d).unwrap();
        let summed = d[shard.clone()].to_vec();
        // Put something else everywhere but the shard: all-gather must overwrite it.
        for (i, x) in d.iter_mut().enumerate() {
            if !shard.contains(&i) {
                *x = f32::NAN;
            }
        }
        c.all_gather(&g, &mut d).unwrap();
        (shard, summed, d)
    });
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
    let full: Vec<f32> = (0..len).map(|i| inputs.iter().map(|d| d[i]).sum::<f32>()).collect();
    for (r, (shard, summed, gathered)) in out.iter().enumerate() {
        assert_eq!(*shard, shard_range(len, world, r));
        for (k, i) in shard.clone().enumerate() {
            assert!((summed[k] - full[i]).abs() < 1e-5);
        }
        assert!(gathered.iter().all(|x| x.is_finite()));
        assert!(gathered.iter().zip(&out[0].2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn broadcast_send_recv_all_to_all_barrier_and_f64_sums() {
    let out = on_ranks(4, Duration::from_secs(10), |mut c| {
        let g = c.world_group();
        let mut b = if c.rank() == 2 { (0..3_000_000u32).map(|i| (i % 251) as u8).collect() } else { vec![0u8; 3_000_000] };
        c.broadcast(&g, &mut b, 2).unwrap();
        let ok_bcast = b.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8);
        // A ring of point-to-point messages.
        let me = c.rank();
        let msg = vec![me as u8; 1000 + me];
        let mut got = vec![0u8; 1000 + (me + 3) % 4];
        if me % 2 == 0 {
            c.send(&g, (me + 1) % 4, &msg).unwrap();
            c.recv(&g, (me + 3) % 4, &mut got).unwrap();
        } else {
            c.recv(&g, (me + 3) % 4, &mut got).unwrap();
            c.send(&g, (me + 1) % 4, &msg).unwrap();
        }
        let ok_p2p = got.iter().all(|x| *x as usize == (me + 3) % 4);
        let send: Vec<f32> = (0..8).map(|j| (me * 10 + j / 2) as f32).collect();
        let mut recv = vec![0.0; 8];
        c.all_to_all(&g, &send, &mut recv).unwrap();
        let ok_a2a = (0..4).all(|i| recv[2 * i] == (i * 10 + me) as f32 && recv[2 * i + 1] == (i * 10 + me) as f32);
        c.barrier(&g).unwrap();
        let mut s = [0.1 * me as f64, 1e-17];
        c.all_reduce_f64(&g, &mut s).unwrap();
        (ok_bcast, ok_p2p, ok_a2a, s)
    });
    for (r, (b, p, a, s)) in out.iter().enumerate() {
        assert!(*b && *p && *a, "rank {r}: broadcast {b} p2p {p} all_to_all {a}");
        assert_eq!(s[0], 0.0 + 0.1 + 0.1 * 2.0 + 0.1 * 3.0);
        assert_eq!(s[1], 4e-17);
    }
}

#[test]
fn two_ranks_may_both_send_before_they_receive() {
    let out = on_ranks(2, Duration::from_secs(10), |mut c| {
        let g = c.world_group();
        let other = 1 - c.rank();
        c.send(&g, other, &[c.rank() as u8; 100]).unwrap();
        let mut got = [0u8; 100];
        c.recv(&g, other, &mut got).unwrap();
        // And a collective afterwards still lines up.
        let mut v = vec![1.0f32; 10];
        c.all_reduce(&g, &mut v, ReduceOp::Sum).unwrap();
        (got[0], v[0])
    });
    assert_eq!(out, vec![(1, 2.0), (0, 2.0)]);
}

#[test]
fn groups_reduce_only_among_their_members() {
    let out = on_ranks(4, Duration::from_secs(10), |mut c| {
        let mesh = DeviceMesh::new(4, 2, 1, 1, 2).unwrap();
        let dp = mesh.group(Axis::Dp, c.rank());
        let tp = mesh.group(Axis::Tp, c.rank());
        let mut a = vec![c.rank() as f32; 50_000];
        c.all_reduce(&dp, &mut a, ReduceOp::Sum).unwrap();
        let mut b = vec![c.rank() as f32; 10];
        c.all_reduce(&tp, &mut b, ReduceOp::Sum).unwrap();
        (a[0], b[0])
    });
    // dp groups {0,2} {1,3}; tp groups {0,1} {2,3}.
    assert_eq!(out, vec![(2.0, 1.0), (4.0, 1.0), (2.0, 5.0), (4.0, 5.0)]);
}

#[test]
fn a_dead_peer_is_named_quickly_and_a_silent_one_after_the_timeout() {
    let addr = free_addr();
    let a2 = addr.clone();
    let dead = std::thread::spawn(move || {
        let c = Comm::connect(1, 2, &a2, Duration::from_secs(10)).unwrap();
        drop(c); // the process "dies": its sockets close
    });
    let mut c = Comm::connect(0, 2, &addr, Duration::from_secs(30)).unwrap();
    dead.join().unwrap();
    let start = Instant::now();
    let err = c.all_reduce(&c.world_group(), &mut vec![1.0; 1 << 20], ReduceOp::Sum).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(err.to_string().starts_with("rank 1: "), "{err}");
    assert!(matches!(err, crate::Error::Comm { rank: Some(1), .. }));

    let addr = free_addr();
    let a2 = addr.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let silent = std::thread::spawn(move || {
        let _c = Comm::connect(1, 2, &a2, Duration::from_secs(10)).unwrap();
        let _ = rx.recv(); // alive, connected, never calls
    });
    let mut c = Comm::connect(0, 2, &addr, Duration::from_millis(400)).unwrap();
    let start = Instant::now();
    let err = c.all_reduce(&c.world_group(), &mut [1.0; 10], ReduceOp::Sum).unwrap_err();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "took {took:?}");
    assert!(err.to_string().contains("rank 1: sent nothing for 400ms"), "{err}");
    // The connection may hold half an exchange: every later call fails at once with the cause.
    assert!(c.is_failed());
    let start = Instant::now();
    let err = c.barrier(&c.world_group()).unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(100), "took {:?}", start.elapsed());
    assert!(matches!(err, crate::Error::Comm { rank: Some(1), .. }), "{err}");
    assert!(err.to_string().contains("sent nothing for 400ms") && err.to_string().contains("an earlier collective failed"), "{err}");
    tx.send(()).unwrap();
    silent.join().unwrap();
}

#[test]
fn ranks_calling_different_collectives_fail_instead_of_mixing_data() {
    let out = on_ranks(2, Duration::from_secs(5), |mut c| {
        let g = c.world_group();
        if c.rank() == 0 {
            c.all_reduce(&g, &mut vec![1.0; 100_000], ReduceOp::Sum).map(|_| ())
        } else {
            c.all_gather(&g, &mut vec![1.0; 100_000])
        }
    });
    let err = out[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("out of step"), "{err}");
}

#[test]
fn a_rank_that_never_joins_is_named_by_the_rendezvous() {
    let addr = free_addr();
    let a2 = addr.clone();
    let one = std::thread::spawn(move || Comm::connect(1, 3, &a2, Duration::from_millis(800)).map(|_| ()));
    let err = Comm::connect(0, 3, &addr, Duration::from_millis(800)).unwrap_err().to_string();
    assert!(err.contains("ranks 2 did not join"), "{err}");
    let err1 = one.join().unwrap().unwrap_err().to_string();
    assert!(err1.contains("rendezvous"), "{err1}");
}

/// Strangers connecting to the rendezvous port (a port scanner that sends garbage, one that says
/// nothing and hangs up, a peer claiming a rank of another world) are dropped: the real ranks
/// still meet.
#[test]
fn stray_connections_to_the_rendezvous_do_not_fail_the_job() {
    let addr = free_addr();
    let a0 = addr.clone();
    let zero = std::thread::spawn(move || Comm::connect(0, 2, &a0, Duration::from_secs(20)).map(|c| c.world()));
    let connect = || loop {
        if let Ok(s) = std::net::TcpStream::connect(&addr) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::io::Write;
    connect().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(connect());
    let mut other_world = connect();
    for v in [0x4741_4e54u64, 1, 7] {
        let _ = other_world.write_all(&v.to_le_bytes());
    }
    let one = Comm::connect(1, 2, &addr, Duration::from_secs(20)).map(|c| c.world());
    assert_eq!(one.unwrap(), 2);
    assert_eq!(zero.join().unwrap().unwrap(), 2);
}

#[test]
fn async_operations_run_in_order_and_hand_their_buffers_back() {
    let out = on_ranks(2, Duration::from_secs(10), |c| {
        let a = AsyncComm::new(c).unwrap();
        let pending: Vec<_> = (0..5)
            .map(|k| {
                a.submit(move |c: &mut Comm| {
                    let mut v = vec![k as f32 + c.rank() as f32; 70_000];
                    c.all_reduce(&c.world_group(), &mut v, ReduceOp::Sum)?;
                    Ok(v[0])
                })
            })
            .collect();
        pending.into_iter().map(|p| p.wait().unwrap().0).collect::<Vec<f32>>()
    });
    assert_eq!(out[0], vec![1.0, 3.0, 5.0, 7.0, 9.0]);
    assert_eq!(out[0], out[1]);
}

#[test]
fn ranks_on_one_machine_use_unix_sockets_and_tcp_when_asked_with_the_same_results() {
    for transport in [Transport::Auto, Transport::Tcp] {
        let addr = free_addr();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Comm::connect_with(r, 3, &addr, Duration::from_secs(20), transport).unwrap();
                    let kinds = c.transports();
                    let mut d = data(r, 300_001);
                    c.all_reduce(&c.world_group(), &mut d, ReduceOp::Sum).unwrap();
                    let g = c.world_group();
                    let mine = c.reduce_scatter(&g, &mut data(r, 1001)).unwrap();
                    (kinds, d, mine)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want_kind = if transport == Transport::Auto { "unix" } else { "tcp" };
        for (r, (kinds, _, mine)) in out.iter().enumerate() {
            for (p, k) in kinds.iter().enumerate() {
                assert_eq!(*k, if p == r { "self" } else { want_kind }, "{transport:?}: rank {r} to {p}");
            }
            assert_eq!(*mine, shard_range(1001, 3, r));
        }
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| data(r, 300_001)).collect();
        for i in (0..300_001).step_by(1009) {
            let want: f64 = inputs.iter().map(|d| d[i] as f64).sum();
            assert!((out[0].1[i] as f64 - want).abs() < 1e-5, "{transport:?} [{i}]");
        }
    }
}
