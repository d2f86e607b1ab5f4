//! Collective communication between ranks: all-reduce, reduce-scatter, all-gather, broadcast,
//! send/recv, all-to-all and barrier, over groups of ranks (the axes of a [`DeviceMesh`]).
//!
//! The CPU backend runs over TCP between processes (and so between machines): large messages
//! take bandwidth-optimal ring algorithms (reduce-scatter then all-gather, each rank sending
//! `2(n-1)/n` of the data), small ones a latency-optimal direct exchange. Reductions are
//! deterministic and every rank ends with the same bits: in the ring each segment is summed in a
//! fixed order and then copied around; in the direct exchange everyone sums in rank order.
//!
//! Every collective begins with a small header (operation, sequence number, length) that the
//! receiving rank checks, so ranks that disagree about what they are doing fail with an error
//! instead of exchanging garbage.

mod async_comm;
mod mesh;
#[cfg(feature = "cuda")]
mod nccl;
mod rendezvous;
#[cfg(test)]
mod tests;
mod transport;

use std::ops::Range;
use std::time::Duration;

pub use async_comm::{AsyncComm, Pending};
pub use mesh::{Axis, DeviceMesh};
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
pub use rendezvous::Transport;
use transport::{peer_error, Incoming, Links, Outgoing};

use crate::{Error, Result};

/// Below this many bytes an all-reduce exchanges whole vectors directly (one round trip per
/// peer) instead of walking the ring (2(n-1) dependent steps).
pub const SMALL_MESSAGE_BYTES: usize = 64 * 1024;

/// Floats per rank segment in one pass of a large all-reduce (1 MiB).
const RING_PIECE_FLOATS: usize = 1 << 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
}

/// A set of ranks that communicate together; `me` is this rank's position in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub ranks: Vec<usize>,
    pub me: usize,
}

impl Group {
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    fn next(&self) -> usize {
        self.ranks[(self.me + 1) % self.size()]
    }

    fn prev(&self) -> usize {
        self.ranks[(self.me + self.size() - 1) % self.size()]
    }
}

/// The range of `len` elements that shard `i` of `n` holds: contiguous, sizes differ by at most 1.
pub fn shard_range(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, rem) = (len / n, len % n);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    SendRecv = 5,
    AllToAll = 6,
    Barrier = 7,
    Shift = 8,
}

/// One rank's endpoint.
#[derive(Debug)]
pub struct Comm {
    links: Links,
    world: usize,
    /// Headers sent to and received from each peer: a header carries the count, so mismatched
    /// calls are caught. Two counters, so that two ranks sending to each other before receiving
    /// (as pipeline stages do) agree.
    sent: Vec<u32>,
    received: Vec<u32>,
    /// Receive buffer of the ring reduction, kept between calls: a fresh one would cost a page
    /// fault per 4 KiB on every large all-reduce.
    scratch: Vec<f32>,
    /// The first failure (peer, message): a failed collective may leave bytes half-sent or
    /// half-read on a connection, so every later one fails at once with this cause instead of
    /// exchanging garbage or waiting out its timeout.
    failed: Option<(Option<usize>, String)>,
}

impl Comm {
    /// Joins the world through the rendezvous address (rank 0 listens there), over the transport
    /// `GANTRY_COMM_TRANSPORT` asks for (Unix sockets on one machine unless it says `tcp`).
    pub fn connect(rank: usize, world: usize, rendezvous: &str, timeout: Duration) -> Result<Comm> {
        Self::connect_with(rank, world, rendezvous, timeout, Transport::from_env())
    }

    /// As `connect`, over `transport`.
    pub fn connect_with(rank: usize, world: usize, rendezvous: &str, timeout: Duration, transport: Transport) -> Result<Comm> {
        let streams = rendezvous::connect_mesh(rank, world, rendezvous, timeout, transport)?;
        Ok(Comm {
            links: Links { rank, streams, timeout, bytes_sent: 0, bytes_received: 0 },
            world,
            sent: vec![0; world],
            received: vec![0; world],
            scratch: Vec::new(),
            failed: None,
        })
    }

    pub fn rank(&self) -> usize {
        self.links.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// How long any wait on a peer may take before it fails.
    pub fn timeout(&self) -> Duration {
        self.links.timeout
    }

    /// Bytes sent and received so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.links.bytes_sent, self.links.bytes_received)
    }

    /// The kind of connection to each peer (`"unix"` or `"tcp"`; `"self"` at this rank).
    pub fn transports(&self) -> Vec<&'static str> {
        self.links.streams.iter().map(|s| s.as_ref().map_or("self", |s| s.kind())).collect()
    }

    /// All ranks.
    pub fn world_group(&self) -> Group {
        Group { ranks: (0..self.world).collect(), me: self.rank() }
    }

    /// The group of `ranks` (which must include this rank).
    pub fn group(&self, ranks: &[usize]) -> Result<Group> {
        let me = ranks
            .iter()
            .position(|r| *r == self.rank())
            .ok_or_else(|| Error::Comm { rank: None, message: format!("rank {} is not in the group {ranks:?}", self.rank()) })?;
        Ok(Group { ranks: ranks.to_vec(), me })
    }

    /// Runs one operation on the connections, unless an earlier one failed; a failure here marks
    /// the endpoint as failed.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some((rank, cause)) = &self.failed {
            return Err(Error::Comm {
                rank: *rank,
                message: format!("{cause} (an earlier collective failed; the connections are unusable)"),
            });
        }
        let r = op(self);
        if let Err(e) = &r {
            self.failed = Some(match e {
                Error::Comm { rank, message } => (*rank, message.clone()),
                other => (None, other.to_string()),
            });
        }
        r
    }

    /// Whether an operation has failed (every later one then fails at once).
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Sends this op's header to `to` while checking the one from `from`.
    fn header(&mut self, op: Op, len: usize, to: usize, from: usize) -> Result<()> {
        let mine = [op as u32 as u64 | (u64::from(self.sent[to]) << 32), len as u64];
        let expect = [op as u32 as u64 | (u64::from(self.received[from]) << 32), len as u64];
        self.sent[to] = self.sent[to].wrapping_add(1);
        self.received[from] = self.received[from].wrapping_add(1);
        let out: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut got = [0u8; 16];
        self.links.exchange(Some(Outgoing { peer: to, bufs: vec![&out] }), Some(Incoming { peer: from, buf: &mut got, progress: None }))?;
        let theirs = [u64::from_le_bytes(got[..8].try_into().expect("8")), u64::from_le_bytes(got[8..].try_into().expect("8"))];
        if theirs != expect {
            return Err(peer_error(
                from,
                format!(
                    "is out of step: it started op {} #{} on {} elements, this rank op {:?} #{} on {len}",
                    theirs[0] as u32,
                    theirs[0] >> 32,
                    theirs[1],
                    op,
                    expect[0] >> 32
                ),
            ));
        }
        Ok(())
    }

    /// Sums (or averages) `data` across the group; every rank ends with the same bits.
    pub fn all_reduce(&mut self, g: &Group, data: &mut [f32], op: ReduceOp) -> Result<()> {
        self.guarded(|c| {
            let n = g.size();
            if n > 1 {
                if data.len() * 4 < SMALL_MESSAGE_BYTES {
                    c.all_reduce_direct(g, data)?;
                } else {
                    c.header(Op::AllReduce, data.len(), g.next(), g.prev())?;
                    // Piece by piece, so that what a rank reduces is still in its caches when it sends
                    // it on in the all-gather (measured: 2× the bus bandwidth of one pass at 64 MiB).
                    for piece in data.chunks_mut(RING_PIECE_FLOATS * n) {
                        c.ring_reduce_scatter(g, piece)?;
                        c.ring_all_gather(g, piece)?;
                    }
                }
            }
            if op == ReduceOp::Avg {
                let inv = 1.0 / n as f32;
                data.iter_mut().for_each(|x| *x *= inv);
            }
            Ok(())
        })
    }

    /// Sums in f64 (loss sums, norms): small vectors, exact rank-order sums.
    pub fn all_reduce_f64(&mut self, g: &Group, data: &mut [f64]) -> Result<()> {
        self.guarded(|c| {
            let mut bits: Vec<f32> = data
                .iter()
                .flat_map(|v| {
                    let b = v.to_bits();
                    [f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32)]
                })
                .collect();
            let all = c.all_gather_direct(g, &mut bits)?;
            for (i, v) in data.iter_mut().enumerate() {
                *v = all
                    .iter()
                    .map(|rank| f64::from_bits(u64::from(rank[2 * i].to_bits()) | (u64::from(rank[2 * i + 1].to_bits()) << 32)))
                    .sum();
            }
            Ok(())
        })
    }

    /// Every rank's whole `data`, in group order (exchanged directly with each peer).
    fn all_gather_direct(&mut self, g: &Group, data: &mut [f32]) -> Result<Vec<Vec<f32>>> {
        let n = g.size();
        let mut all = vec![Vec::new(); n];
        all[g.me] = data.to_vec();
        for k in 1..n {
            let (to, from) = (g.ranks[(g.me + k) % n], (g.me + n - k) % n);
            self.header(Op::AllReduce, data.len(), to, g.ranks[from])?;
            let mut buf = vec![0f32; data.len()];
            self.links.exchange(
                Some(Outgoing { peer: to, bufs: vec![bytemuck::cast_slice(data)] }),
                Some(Incoming { peer: g.ranks[from], buf: bytemuck::cast_slice_mut(&mut buf), progress: None }),
            )?;
            all[from] = buf;
        }
        Ok(all)
    }

    fn all_reduce_direct(&mut self, g: &Group, data: &mut [f32]) -> Result<()> {
        let all = self.all_gather_direct(g, data)?;
        for (i, x) in data.iter_mut().enumerate() {
            let mut s = 0.0f32;
            for rank in &all {
                s += rank[i];
            }
            *x = s;
        }
        Ok(())
    }

    /// Reduce-scatter in place: afterwards this rank's shard (`shard_range(len, n, me)`) of `data`
    /// holds the group's sum; the rest of `data` is scratch. Returns the shard's range.
    pub fn reduce_scatter(&mut self, g: &Group, data: &mut [f32]) -> Result<Range<usize>> {
        self.guarded(|c| {
            if g.size() > 1 {
                c.header(Op::ReduceScatter, data.len(), g.next(), g.prev())?;
                c.ring_reduce_scatter(g, data)?;
            }
            Ok(shard_range(data.len(), g.size(), g.me))
        })
    }

    /// All-gather in place: each rank contributes its shard of `data`; afterwards every rank holds
    /// all shards.
    pub fn all_gather(&mut self, g: &Group, data: &mut [f32]) -> Result<()> {
        self.guarded(|c| {
            if g.size() > 1 {
                c.header(Op::AllGather, data.len(), g.next(), g.prev())?;
                c.ring_all_gather(g, data)?;
            }
            Ok(())
        })
    }

    /// Step s: send segment (me - s - 1) to the next rank, receive segment (me - s - 2) from the
    /// previous one and add it in, as it arrives. After n - 1 steps segment `me` is complete.
    fn ring_reduce_scatter(&mut self, g: &Group, data: &mut [f32]) -> Result<()> {
        let (n, len) = (g.size(), data.len());
        let seg = |i: usize| shard_range(len, n, i % n);
        let mut tmp = std::mem::take(&mut self.scratch);
        if tmp.len() < seg(0).len() {
            tmp.resize(seg(0).len(), 0.0);
        }
        for s in 0..n - 1 {
            let (send_i, recv_i) = ((g.me + 2 * n - s - 1) % n, (g.me + 2 * n - s - 2) % n);
            let (sr, rr) = (seg(send_i), seg(recv_i));
            let (send, dest) = disjoint(data, sr, rr.clone());
            let recv = &mut tmp[..rr.len()];
            let mut reduced = 0usize;
            let mut add = |bytes: &[u8]| {
                let ready = bytes.len() / 4;
                if ready > reduced {
                    let got: &[f32] = bytemuck::cast_slice(&bytes[reduced * 4..ready * 4]);
                    for (d, x) in dest[reduced..ready].iter_mut().zip(got) {
                        *d += *x;
                    }
                    reduced = ready;
                }
            };
            self.links.exchange(
                Some(Outgoing { peer: g.next(), bufs: vec![bytemuck::cast_slice(send)] }),
                Some(Incoming { peer: g.prev(), buf: bytemuck::cast_slice_mut(recv), progress: Some(&mut add) }),
            )?;
        }
        self.scratch = tmp;
        Ok(())
    }

    /// Step s: send segment (me - s) to the next rank, receive segment (me - s - 1) in place.
    fn ring_all_gather(&mut self, g: &Group, data: &mut [f32]) -> Result<()> {
        let (n, len) = (g.size(), data.len());
        for s in 0..n - 1 {
            let (send_i, recv_i) = ((g.me + n - s) % n, (g.me + 2 * n - s - 1) % n);
            let (send, recv) = disjoint(data, shard_range(len, n, send_i), shard_range(len, n, recv_i));
            self.links.exchange(
                Some(Outgoing { peer: g.next(), bufs: vec![bytemuck::cast_slice(send)] }),
                Some(Incoming { peer: g.prev(), buf: bytemuck::cast_slice_mut(recv), progress: None }),
            )?;
        }
        Ok(())
    }

    /// Copies `root`'s `data` (its position in the group) to every rank, along the ring.
    pub fn broadcast(&mut self, g: &Group, data: &mut [u8], root: usize) -> Result<()> {
        self.guarded(|c| {
            let n = g.size();
            if n == 1 {
                return Ok(());
            }
            c.header(Op::Broadcast, data.len(), g.next(), g.prev())?;
            // Position along the ring counted from the root; the last one only receives.
            let pos = (g.me + n - root) % n;
            const PIECE: usize = 1 << 20;
            for start in (0..data.len()).step_by(PIECE) {
                let end = (start + PIECE).min(data.len());
                if pos != 0 {
                    c.links.exchange(None, Some(Incoming { peer: g.prev(), buf: &mut data[start..end], progress: None }))?;
                }
                if pos != n - 1 {
                    c.links.exchange(Some(Outgoing { peer: g.next(), bufs: vec![&data[start..end]] }), None)?;
                }
            }
            Ok(())
        })
    }

    /// Point to point: sends `data` to the group member at position `to`.
    pub fn send(&mut self, g: &Group, to: usize, data: &[u8]) -> Result<()> {
        self.guarded(|c| {
            let peer = g.ranks[to];
            let head: Vec<u8> = [Op::SendRecv as u32 as u64 | (u64::from(c.sent[peer]) << 32), data.len() as u64]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            c.sent[peer] = c.sent[peer].wrapping_add(1);
            c.links.exchange(Some(Outgoing { peer, bufs: vec![&head, data] }), None)
        })
    }

    /// Point to point: receives exactly `data.len()` bytes from the member at position `from`.
    pub fn recv(&mut self, g: &Group, from: usize, data: &mut [u8]) -> Result<()> {
        self.guarded(|c| {
            let peer = g.ranks[from];
            let mut head = [0u8; 16];
            c.links.exchange(None, Some(Incoming { peer, buf: &mut head, progress: None }))?;
            let want = [Op::SendRecv as u32 as u64 | (u64::from(c.received[peer]) << 32), data.len() as u64];
            c.received[peer] = c.received[peer].wrapping_add(1);
            let got = [u64::from_le_bytes(head[..8].try_into().expect("8")), u64::from_le_bytes(head[8..].try_into().expect("8"))];
            if got != want {
                return Err(peer_error(peer, format!("sent {} bytes (op {}) where {} were expected", got[1], got[0] as u32, data.len())));
            }
            c.links.exchange(None, Some(Incoming { peer, buf: data, progress: None }))
        })
    }

    /// One step around the ring: `send` goes to the next member while `recv` (the same length)
    /// fills from the previous one (ring attention's key/value blocks).
    pub fn shift(&mut self, g: &Group, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::Comm { rank: None, message: format!("shift: {} elements sent, {} received", send.len(), recv.len()) });
        }
        self.guarded(|c| {
            if g.size() == 1 {
                recv.copy_from_slice(send);
                return Ok(());
            }
            let (to, from) = (g.next(), g.prev());
            c.header(Op::Shift, send.len(), to, from)?;
            c.links.exchange(
                Some(Outgoing { peer: to, bufs: vec![bytemuck::cast_slice(send)] }),
                Some(Incoming { peer: from, buf: bytemuck::cast_slice_mut(recv), progress: None }),
            )
        })
    }

    /// All-to-all: block j of `send` goes to member j; block i of `recv` comes from member i.
    /// Both hold `n` equal blocks.
    pub fn all_to_all(&mut self, g: &Group, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = g.size();
        if send.len() != recv.len() || !send.len().is_multiple_of(n) {
            return Err(Error::Comm {
                rank: None,
                message: format!("all_to_all: {} and {} elements do not split into {n} blocks", send.len(), recv.len()),
            });
        }
        let b = send.len() / n;
        // (A call with wrong sizes moves no bytes, so it leaves the endpoint usable.)
        self.guarded(|c| {
            recv[g.me * b..(g.me + 1) * b].copy_from_slice(&send[g.me * b..(g.me + 1) * b]);
            for k in 1..n {
                let (to, from) = ((g.me + k) % n, (g.me + n - k) % n);
                c.header(Op::AllToAll, b, g.ranks[to], g.ranks[from])?;
                c.links.exchange(
                    Some(Outgoing { peer: g.ranks[to], bufs: vec![bytemuck::cast_slice(&send[to * b..(to + 1) * b])] }),
                    Some(Incoming {
                        peer: g.ranks[from],
                        buf: bytemuck::cast_slice_mut(&mut recv[from * b..(from + 1) * b]),
                        progress: None,
                    }),
                )?;
            }
            Ok(())
        })
    }

    /// Returns once every member has called it.
    pub fn barrier(&mut self, g: &Group) -> Result<()> {
        self.guarded(|c| {
            let n = g.size();
            // Dissemination barrier: log2(n) rounds of header exchanges.
            let mut k = 1;
            while k < n {
                c.header(Op::Barrier, 0, g.ranks[(g.me + k) % n], g.ranks[(g.me + n - k) % n])?;
                k *= 2;
            }
            Ok(())
        })
    }
}

/// Two disjoint ranges of one slice, the first shared and the second mutable.
fn disjoint(data: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    debug_assert!(a.end <= b.start || b.end <= a.start, "{a:?} and {b:?} overlap");
    if a.start < b.start {
        let (lo, hi) = data.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = data.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}
