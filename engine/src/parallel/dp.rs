//! Data parallelism over the flat parameter buffers, with ZeRO stage 1.
//!
//! Every rank of the dp group trains on its slice of each global batch (the data order does not
//! depend on how the batch is split). The gradients are summed across the group, so every rank
//! holds the global batch's gradient; the norm and clipping then agree on every rank without
//! further communication. Without ZeRO each rank updates all parameters identically. With ZeRO-1
//! rank r keeps AdamW's moments for its shard of the flat buffer only
//! (`shard_range(len, n, r)`), updates that shard, and an all-gather brings every rank the whole
//! updated parameters.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::comm::{shard_range, Axis, Comm, DeviceMesh, Group, ReduceOp};
use crate::{Error, Result};

pub struct DataParallel {
    comm: Comm,
    group: Group,
    zero: u8,
    /// Time spent communicating since the last `take_comm_time`.
    comm_time: Duration,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel").field("group", &self.group).field("zero", &self.zero).finish()
    }
}

impl DataParallel {
    pub fn new(comm: Comm, mesh: &DeviceMesh, zero: u8) -> Result<DataParallel> {
        if zero > 1 {
            return Err(Error::Unsupported {
                field: "parallel.zero".into(),
                message: format!("ZeRO stage {zero} is not built yet: this version runs stages 0 and 1"),
            });
        }
        let group = mesh.group(Axis::Dp, comm.rank());
        Ok(DataParallel { comm, group, zero, comm_time: Duration::ZERO })
    }

    /// This rank's position in the dp group.
    pub fn rank(&self) -> usize {
        self.group.me
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    pub fn zero(&self) -> u8 {
        self.zero
    }

    /// The part of a flat buffer of `len` elements whose optimizer state this rank holds.
    pub fn shard(&self, len: usize) -> Range<usize> {
        if self.zero >= 1 {
            shard_range(len, self.size(), self.rank())
        } else {
            0..len
        }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut Comm, &Group) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f(&mut self.comm, &self.group);
        self.comm_time += start.elapsed();
        r
    }

    /// The group's sum of a per-rank loss sum.
    pub fn sum(&mut self, x: f64) -> Result<f64> {
        let mut v = [x];
        self.timed(|c, g| c.all_reduce_f64(g, &mut v))?;
        Ok(v[0])
    }

    /// Sums gradients across the group, in place.
    pub fn sync_grads(&mut self, grads: &mut [f32]) -> Result<()> {
        self.timed(|c, g| c.all_reduce(g, grads, ReduceOp::Sum))
    }

    /// After a ZeRO-1 update of this rank's shard: every rank gets every shard.
    pub fn gather_params(&mut self, params: &mut [f32]) -> Result<()> {
        if self.zero >= 1 {
            self.timed(|c, g| c.all_gather(g, params))?;
        }
        Ok(())
    }

    /// The whole of a sharded buffer (each rank passes its shard), for checkpoints.
    pub fn gather_shards(&mut self, shard: &[f32], len: usize) -> Result<Vec<f32>> {
        let mut full = vec![0.0; len];
        let mine = self.shard(len);
        full[mine].copy_from_slice(shard);
        if self.zero >= 1 {
            self.timed(|c, g| c.all_gather(g, &mut full))?;
        }
        Ok(full)
    }

    /// Waits for every rank of the group.
    pub fn barrier(&mut self) -> Result<()> {
        self.timed(|c, g| c.barrier(g))
    }

    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut self.comm_time)
    }
}
