//! The fused softmax cross-entropy launchers.

use super::*;

/// Summed loss (nats) of the rows of `logits` (`[rows, vocab]`) against `targets`. With
/// `grad_scale = Some(s)`, overwrites `logits` with `s * (softmax - onehot)`.
pub fn softmax_xent<T: Storage>(
    gpu: &Gpu,
    logits: &mut impl Out<T>,
    targets: &impl In<u32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<f64> {
    let rows = targets.view().len();
    let mut losses = gpu.stream().alloc_zeros::<f32>(rows.max(1)).map_err(|e| Error::cuda("allocating losses", e))?;
    softmax_xent_rows(gpu, logits, targets, &mut losses, vocab, grad_scale)?;
    let host = gpu.stream().clone_dtoh(&losses).map_err(|e| Error::cuda("copying losses", e))?;
    Ok(host[..rows].iter().map(|&l| l as f64).sum())
}

/// As [`softmax_xent`], leaving each row's loss in `losses` on the device instead of summing
/// them on the host: no synchronisation, so a caller looping over blocks of rows keeps the GPU
/// busy and reads all the losses once.
pub fn softmax_xent_rows<T: Storage>(
    gpu: &Gpu,
    logits: &mut impl Out<T>,
    targets: &impl In<u32>,
    losses: &mut impl Out<f32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    let mut logits = logits.view_mut();
    let targets = targets.view();
    let mut losses = losses.view_mut();
    let rows = targets.len();
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("losses", losses.len(), rows)?;
    let name = format!("softmax_xent_{}", T::SUFFIX);
    let f = gpu.function("cross_entropy", &name)?;
    let (vocab32, scale, write) = (u32_of("vocab", vocab)?, grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (1024.min(row_block(vocab)), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut logits).arg(&mut losses).arg(&targets).arg(&vocab32).arg(&scale).arg(&write);
    // SAFETY: one block per row of vocab, one loss per row; targets are checked < vocab by the
    // data loader, as on CPU.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Vocabulary-parallel cross-entropy, first half (see `cpu::loss::xent_stats`): `logits`
/// (`[rows, vocab]`) are this rank's vocabulary entries `first..first + vocab`; each row's max,
/// sum of `exp(logit − max)` and target logit go to `stats` (`[rows, 3]`), and the row becomes
/// `exp(logit − max)`.
pub fn xent_stats<T: Storage>(
    gpu: &Gpu,
    logits: &mut impl Out<T>,
    targets: &impl In<u32>,
    stats: &mut impl Out<f32>,
    vocab: usize,
    first: usize,
) -> Result<()> {
    let mut logits = logits.view_mut();
    let targets = targets.view();
    let mut stats = stats.view_mut();
    let rows = targets.len();
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("stats", stats.len(), rows * 3)?;
    let name = format!("xent_stats_{}", T::SUFFIX);
    let f = gpu.function("cross_entropy", &name)?;
    let (vocab32, first32) = (u32_of("vocab", vocab)?, u32_of("first", first)?);
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (1024.min(row_block(vocab)), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut logits).arg(&mut stats).arg(&targets).arg(&vocab32).arg(&first32);
    // SAFETY: one block per row of vocab entries, three statistics per row; a target outside
    // first..first + vocab is never read.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Vocabulary-parallel cross-entropy, second half (see `cpu::loss::xent_finish`): each row's
/// loss into `losses` from the group's statistics `global`; with `grad_scale = Some(s)` the rows
/// (as `xent_stats` left them, with this rank's statistics `local`) become this rank's part of
/// `s · (softmax − onehot)`.
#[allow(clippy::too_many_arguments)]
pub fn xent_finish<T: Storage>(
    gpu: &Gpu,
    rows: &mut impl Out<T>,
    targets: &impl In<u32>,
    local: &impl In<f32>,
    global: &impl In<f32>,
    losses: &mut impl Out<f32>,
    vocab: usize,
    first: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    let mut rows_v = rows.view_mut();
    let targets = targets.view();
    let (local, global) = (local.view(), global.view());
    let mut losses = losses.view_mut();
    let n = targets.len();
    check_len("logits", rows_v.len(), n * vocab)?;
    check_len("local statistics", local.len(), n * 3)?;
    check_len("global statistics", global.len(), n * 3)?;
    check_len("losses", losses.len(), n)?;
    let name = format!("xent_finish_{}", T::SUFFIX);
    let f = gpu.function("cross_entropy", &name)?;
    let (vocab32, first32) = (u32_of("vocab", vocab)?, u32_of("first", first)?);
    let (scale, write) = (grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", n)?, 1, 1), block_dim: (1024.min(row_block(vocab)), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut rows_v).arg(&mut losses).arg(&targets).arg(&local).arg(&global).arg(&vocab32).arg(&first32).arg(&scale).arg(&write);
    // SAFETY: one block per row of vocab entries; statistics and losses checked per row above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}
