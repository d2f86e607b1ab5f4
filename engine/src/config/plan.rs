//! The parallel plan: the sizes of the mesh's axes, the ZeRO stage, and how GPU ranks talk.

use crate::comm::DeviceMesh;
use crate::pipeline::ScheduleKind;
use crate::Result;

/// How the ranks of a job divide the work. `dp × pp × sp × tp` ranks make the world; the mesh
/// lays them out with tp innermost (see [`DeviceMesh`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParallelPlan {
    /// Data-parallel replicas (or, under ZeRO, shards of the model state).
    pub dp: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// How tensor parallelism cuts the layers.
    pub tp_mode: TpMode,
    /// Pipeline stages.
    pub pp: usize,
    /// How micro-batches flow through the stages.
    pub pp_schedule: ScheduleKind,
    /// Block ranges (virtual stages) per pipeline rank: 1 for gpipe and 1f1b, 2 or more for
    /// interleaved, 2 for zbv.
    pub pp_chunks: usize,
    /// The blocks of each virtual stage in order, when the spec states the cut
    /// (`parallel.pp_layers`); else the cut balances their estimated cost.
    pub pp_layers: Option<Vec<usize>>,
    /// Sequence-parallel ranks.
    pub sp: usize,
    /// How the sequence is split.
    pub sp_mode: SpMode,
    /// ZeRO stage over the dp axis: 0 (plain data parallelism) to 3.
    pub zero: u8,
    /// The communicator of GPU ranks' device buffers.
    pub gpu_comm: GpuComm,
}

impl Default for ParallelPlan {
    fn default() -> Self {
        ParallelPlan {
            dp: 1,
            tp: 1,
            tp_mode: TpMode::OneD,
            pp: 1,
            pp_schedule: ScheduleKind::OneFOneB,
            pp_chunks: 1,
            pp_layers: None,
            sp: 1,
            sp_mode: SpMode::None,
            zero: 0,
            gpu_comm: GpuComm::Nccl,
        }
    }
}

impl ParallelPlan {
    /// Data parallelism over `dp` ranks at ZeRO stage `zero`.
    pub fn data_parallel(dp: usize, zero: u8) -> ParallelPlan {
        ParallelPlan { dp, zero, ..ParallelPlan::default() }
    }

    /// Ranks the plan needs (`None` if the product overflows).
    pub fn world(&self) -> Option<usize> {
        self.dp.checked_mul(self.tp)?.checked_mul(self.pp)?.checked_mul(self.sp)
    }

    /// The mesh of a world of `world` ranks laid out as this plan says; an error naming the
    /// mismatch if the axes do not multiply to it.
    pub fn mesh(&self, world: usize) -> Result<DeviceMesh> {
        DeviceMesh::new(world, self.dp, self.pp, self.sp, self.tp)
    }
}

/// How tensor parallelism cuts the layers (`parallel.tp_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TpMode {
    /// Megatron's column- and row-parallel linears.
    #[default]
    OneD,
    /// Weights and activations on a q × q grid.
    TwoD,
}

/// How the sequence is split across ranks (`parallel.sp_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpMode {
    #[default]
    None,
    SplitGather,
    AllToAll,
    RingAttn,
}

impl SpMode {
    /// The spec's name of the mode.
    pub fn name(&self) -> &'static str {
        match self {
            SpMode::None => "none",
            SpMode::SplitGather => "split_gather",
            SpMode::AllToAll => "all_to_all",
            SpMode::RingAttn => "ring_attn",
        }
    }
}

/// The communicator of a multi-GPU job's device buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuComm {
    /// NCCL, GPU to GPU.
    #[default]
    Nccl,
    /// Staged through host memory over Gantry's socket communicator.
    Host,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Axis;

    #[test]
    fn the_plan_makes_its_mesh_and_names_a_mismatch() {
        let plan = ParallelPlan { dp: 2, sp: 2, tp: 2, ..ParallelPlan::default() };
        assert_eq!(plan.world(), Some(8));
        let mesh = plan.mesh(8).unwrap();
        assert_eq!(mesh.group(Axis::Sp, 5).ranks, vec![5, 7]);
        assert_eq!(mesh.group(Axis::Dp, 5).ranks, vec![1, 5]);
        let e = plan.mesh(4).unwrap_err().to_string();
        assert!(e.contains("sp 2") && e.contains("world of 4"), "{e}");
        assert_eq!(ParallelPlan { dp: usize::MAX, tp: 2, ..ParallelPlan::default() }.world(), None);
    }
}
