"""PyTorch peer for `gantry bench` on LLaMA shapes: transformers' LlamaForCausalLM, fp32, eager
attention through SDPA, AdamW, random tokens. Mirrors ../shared/bench/torch_gpt.py (same timing,
same JSON fields) so the two programs can be run back to back.

Usage: python3 bench/torch_llama.py --config llama-tiny|llama-small [--threads 2] [--seq T] [--batch B]
The configs match gantry's presets of the same names (engine/src/models/presets.rs).
"""
import argparse, json, resource, statistics, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "llama-tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=True, seq=256, batch=8),
    "llama-small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=4, tie_word_embeddings=False, seq=256, batch=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-tiny", choices=CONFIGS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = dict(CONFIGS[a.config])
    T = a.seq or cfg.pop("seq")
    B = a.batch or cfg.pop("batch")
    cfg.pop("seq", None), cfg.pop("batch", None)
    config = LlamaConfig(max_position_embeddings=2048, rope_theta=10000.0, attn_implementation="sdpa", **cfg)
    model = LlamaForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    V = cfg["vocab_size"]
    data = torch.randint(0, V, (a.warmup + a.steps, B, T + 1))
    times, phases, losses = [], [], []
    for i in range(a.warmup + a.steps):
        x, y = data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(t3 - t0)
            phases.append((t1 - t0, t2 - t1, t3 - t2))
    med = statistics.median(times)
    L, C = cfg["num_hidden_layers"], cfg["hidden_size"]
    flops_tok = 6 * n_params + 6 * L * C * T
    print(json.dumps(dict(
        config=a.config, torch=torch.__version__, threads=torch.get_num_threads(), params=n_params, batch=B, seq=T,
        ms_per_step_median=round(med * 1e3, 1), ms_per_step_min=round(min(times) * 1e3, 1), tokens_per_s=round(B * T / med, 1),
        fwd_bwd_opt_ms_median=[round(statistics.median(p[k] for p in phases) * 1e3, 1) for k in range(3)],
        est_gflop_per_s=round(flops_tok * B * T / med / 1e9, 1),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))))


if __name__ == "__main__":
    main()
