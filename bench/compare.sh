#!/usr/bin/env bash
# Runs gantry bench and its PyTorch peer back to back, alternating, and prints the ratio of
# tokens/s and of peak RSS for each shape. Usage: bench/compare.sh [rounds] [shape...]
# Shapes: tiny (gpt2-tiny T256 B8), small (gpt2 124M T256 B4), llama-tiny, llama-small.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"; shift || true
shapes=("${@:-tiny small llama-tiny llama-small}")
peer_gpt=../shared/bench/torch_gpt.py
cargo build --release --quiet
for shape in ${shapes[@]}; do
  case "$shape" in
    tiny) g="--model gpt2-tiny --seq-len 256 --batch 8"; p="python3 $peer_gpt --config tiny --threads 2" ;;
    small) g="--model gpt2 --seq-len 256 --batch 4 --steps 3 --warmup 1"; p="python3 $peer_gpt --config small --threads 2 --steps 3 --warmup 1" ;;
    llama-tiny) g="--model llama-tiny --seq-len 256 --batch 8"; p="python3 bench/torch_llama.py --config llama-tiny --threads 2" ;;
    llama-small) g="--model llama-small --seq-len 256 --batch 4 --steps 3 --warmup 1"; p="python3 bench/torch_llama.py --config llama-small --threads 2 --steps 3 --warmup 1" ;;
    *) echo "unknown shape $shape" >&2; exit 2 ;;
  esac
  for r in $(seq "$rounds"); do
    G=$(./target/release/gantry bench $g --threads 2 2>/dev/null | tail -n 1)
    P=$($p 2>/dev/null | tail -n 1)
    python3 - "$shape" "$G" "$P" <<'PY'
import json, sys
shape, g, p = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{shape:12} gantry {g['tokens_per_s']:9.1f} tok/s {g['model_flops_per_s']/1e9:6.1f} GFLOP/s rss {g['peak_rss_bytes']/2**20:7.0f} MiB | "
      f"torch {p['tokens_per_s']:9.1f} tok/s rss {p['peak_rss_mib']:7.0f} MiB | speed x{g['tokens_per_s']/p['tokens_per_s']:.2f} (best step x{p['ms_per_step_min']/g['step_ms_min']:.2f}) rss x{g['peak_rss_bytes']/2**20/p['peak_rss_mib']:.2f}")
PY
  done
done
