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
