#!/usr/bin/env bash
# DDP overlap: how much of the gradient all-reduce time is hidden behind backward, for random
# GPT-2 models of 6 and 12 layers (C384, vocab 8192, T128, global batch 8) trained on two local
# ranks of one thread each. Reads the per-step `grad_comm_ms` (communication-thread busy time of
# the gradient collectives) and `grad_comm_waited_ms` (what training waited for after backward)
# from metrics.jsonl. Usage: bench/ddp/overlap.sh [layers...] [--zero Z]
set -euo pipefail
cd "$(dirname "$0")/../.."
zero=0
layers=()
while [ $# -gt 0 ]; do
  case "$1" in --zero) zero="$2"; shift 2 ;; *) layers+=("$1"); shift ;; esac
done
[ ${#layers[@]} -eq 0 ] && layers=(6 12)
cargo build --release --quiet -p gantry --bin gantry
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c "
import random
random.seed(1)
open('$work/tokens.u32','wb').write(b''.join(random.randrange(8192).to_bytes(4,'little') for _ in range(300000)))"
for l in "${layers[@]}"; do
  mkdir -p "$work/m$l"
  echo "{\"architectures\":[\"GPT2LMHeadModel\"],\"vocab_size\":8192,\"n_embd\":384,\"n_layer\":$l,\"n_head\":6,\"n_positions\":256}" > "$work/m$l/config.json"
  cat > "$work/spec$l.toml" <<SPEC
[model]
path = "m$l"
init = "random"
[data]
train = "tokens.u32"
seq_len = 128
[train]
steps = 12
global_batch_size = 8
lr = 1e-3
[resources]
devices = "cpu:2"
threads = 1
[parallel]
dp = 2
zero = $zero
SPEC
  target/release/gantry train "$work/spec$l.toml" --run-dir "$work/run$l" --no-progress >/dev/null 2>&1
  python3 - "$work/run$l/metrics.jsonl" "$l" "$zero" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]  # the first two steps warm up
busy = sum(r["grad_comm_ms"] for r in rows) / len(rows)
waited = sum(r["grad_comm_waited_ms"] for r in rows) / len(rows)
step = sum(r["step_ms"] for r in rows) / len(rows)
print(f"{sys.argv[2]:>2} layers, zero {sys.argv[3]}: step {step:6.0f} ms, gradient collectives {busy:6.1f} ms, waited for {waited:5.1f} ms: {100 * (1 - waited / busy):3.0f}% hidden behind backward")
PY
done
