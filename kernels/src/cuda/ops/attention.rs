//! The flash-attention launchers (forward, and the backward's delta, dq and dk/dv kernels).

use super::*;

/// Head dimensions the attention kernels support (their per-lane accumulators are sized for it).
pub const ATTENTION_MAX_DIM: usize = 128;
const Q_ROWS: usize = 16;
const K_ROWS: usize = 8;
const TILE: usize = 32;

fn attention_check(s: &AttnShape, qkv: usize, out: usize, lse: usize) -> Result<()> {
    if s.dim == 0 || s.dim > ATTENTION_MAX_DIM {
        return Err(Error::Shape(format!("attention: head dimension {} is outside 1..={ATTENTION_MAX_DIM}", s.dim)));
    }
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::Shape(format!("attention: {} heads are not a multiple of {} key/value heads", s.heads, s.kv_heads)));
    }
    let rows = s.batch * s.seq;
    check_len("attention qkv", qkv, rows * s.qkv_width())?;
    check_len("attention out", out, rows * s.out_width())?;
    check_len("attention lse", lse, rows * s.heads)
}

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_MEM: u32 = 48 * 1024;

/// Raises `f`'s dynamic shared-memory limit to `bytes` where that is above the 48 KiB default (the
/// attention backward's dq kernel needs 49.5 KiB at dim 128); without it the launch fails.
fn allow_shared_mem(gpu: &Gpu, f: &CudaFunction, name: &str, bytes: u32) -> Result<()> {
    if bytes <= DEFAULT_SHARED_MEM {
        return Ok(());
    }
    gpu.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
    f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        .map_err(|e| Error::cuda(format!("allowing {bytes} bytes of shared memory for {name}"), e))
}

fn shape_args(s: &AttnShape) -> Result<[u32; 5]> {
    Ok([u32_of("batch", s.batch)?, u32_of("seq", s.seq)?, s.heads as u32, s.kv_heads as u32, s.dim as u32])
}

/// `out = softmax(q kᵀ / √dim + causal mask) v` per head; `lse` receives each row's log-sum-exp.
pub fn attention_forward<T: Storage>(
    gpu: &Gpu,
    s: AttnShape,
    qkv: &impl In<T>,
    out: &mut impl Out<T>,
    lse: &mut impl Out<f32>,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut lse = lse.view_mut();
    let qkv = qkv.view();
    attention_check(&s, qkv.len(), out.len(), lse.len())?;
    let name = format!("attention_fwd_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let [batch, seq, heads, kv_heads, dim] = shape_args(&s)?;
    let scale = 1.0 / (s.dim as f32).sqrt();
    let smem = ((Q_ROWS + 2 * TILE) * (s.dim + 1) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(Q_ROWS) as u32, heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut lse).arg(&qkv).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: sizes checked by attention_check; shared memory sized for the tiles at this dim.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Writes `dqkv` (same layout as `qkv`) from the output gradient `dout`, recomputing the
/// probabilities from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Storage>(
    gpu: &Gpu,
    s: AttnShape,
    qkv: &impl In<T>,
    out: &impl In<T>,
    lse: &impl In<f32>,
    dout: &impl In<T>,
    dqkv: &mut impl Out<T>,
) -> Result<()> {
    let mut dqkv = dqkv.view_mut();
    let qkv = qkv.view();
    let out = out.view();
    let lse = lse.view();
    let dout = dout.view();
    attention_check(&s, qkv.len(), out.len(), lse.len())?;
    check_len("attention dout", dout.len(), s.batch * s.seq * s.out_width())?;
    check_len("attention dqkv", dqkv.len(), qkv.len())?;
    let [batch, seq, heads, kv_heads, dim] = shape_args(&s)?;
    let rows = s.batch * s.seq;
    let scale = 1.0 / (s.dim as f32).sqrt();
    let stream = gpu.stream();
    let mut delta = stream.alloc_zeros::<f32>(rows * s.heads).map_err(|e| Error::cuda("allocating attention delta", e))?;

    let name = format!("attention_bwd_delta_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let rows32 = u32_of("rows", rows)?;
    let warps = rows * s.heads;
    let cfg =
        LaunchConfig { grid_dim: ((warps * 32).div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut delta).arg(&out).arg(&dout).arg(&rows32).arg(&heads).arg(&dim);
    // SAFETY: one warp per (row, head); sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let name = format!("attention_bwd_dq_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let smem = ((2 * Q_ROWS + 2 * TILE) * (s.dim + 1) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(Q_ROWS) as u32, heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dqkv).arg(&qkv).arg(&dout).arg(&lse).arg(&delta).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: as the forward; writes only the query columns of dqkv.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let name = format!("attention_bwd_dkv_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let smem = (((2 * K_ROWS + 2 * TILE) * (s.dim + 1) + 2 * TILE) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(K_ROWS) as u32, kv_heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dqkv).arg(&qkv).arg(&dout).arg(&lse).arg(&delta).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: writes only the key and value columns of dqkv.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}
