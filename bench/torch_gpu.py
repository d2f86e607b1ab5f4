"""PyTorch eager on one GPU: the shared peer's GPT-2 (../shared/bench/torch_gpt.py) trained in bf16
autocast, for `gantry bench --device cuda:0 --precision bf16` beside it in the same session.

Usage: python bench/torch_gpu.py [--config small] [--seq 1024] [--batch 8] [--warmup 3] [--steps 10]
Prints one JSON line: tokens/s (median step), ms/step, MFU against the 989.4 TFLOP/s dense bf16 peak.
"""
import argparse, json, os, statistics, sys, time

import torch

_here = os.path.dirname(os.path.abspath(__file__))
# The shared peer beside the repository, or the copy scripts/gpu-check packs for a GPU machine.
sys.path[:0] = [os.path.join(_here, "..", "..", "shared", "bench"), os.path.join(_here, "..", ".gpu")]
from torch_gpt import CONFIGS, GPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small", choices=CONFIGS)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.4)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = dict(CONFIGS[a.config], seq=a.seq, batch=a.batch)
    B, T, V = cfg["batch"], cfg["seq"], cfg["vocab"]
    model = GPT(**cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = torch.randint(0, V, (a.warmup + a.steps, B, T + 1), device="cuda")
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        x, y = data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    flops_tok = 6 * (n_params - model.wpe.weight.numel()) + 6 * cfg["n_layer"] * cfg["n_embd"] * T
    tps = B * T / med
    print(json.dumps(dict(
        config=a.config, torch=torch.__version__, device=torch.cuda.get_device_name(0), params=n_params,
        batch=B, seq=T, ms_per_step_median=round(med * 1e3, 2), tokens_per_s=round(tps, 1),
        model_flops_per_s=flops_tok * tps, mfu=round(flops_tok * tps / (a.peak_tflops * 1e12), 4),
        peak_mem_bytes=torch.cuda.max_memory_allocated(), loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))))


if __name__ == "__main__":
    main()
