#!/usr/bin/env bash
# Tensor parallelism on a multi-GPU machine, in one call: parity first, then throughput.
#   bash benchmarks/gpu_tp.sh [ARCH]      (ARCH: a bench preset, default llama-3.1-8b)
# 1. TP=2 (and TP=4 when 4 GPUs are visible) greedy == TP=1 on the tiny models (float32,
#    NCCL, CUDA graphs, Triton kernels) and the default model.
# 2. tokenmill bench throughput --workload nano --dummy-weights --arch ARCH at TP=1, 2 (, 4).
# Logs go to $OUT (the device tool's output folder) or ./out/gpu_tp; a short table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_tp}; mkdir -p "$OUT"
arch=${1:-llama-3.1-8b}
ngpu=$(nvidia-smi -L | wc -l)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
sizes="2"; [ "$ngpu" -ge 4 ] && sizes="2 4"
echo "card: $ngpu x $card; TP sizes: $sizes" | tee "$OUT/summary.txt"
if [ "$ngpu" -lt 2 ]; then echo "tensor parallelism needs 2+ GPUs" | tee -a "$OUT/summary.txt"; exit 1; fi

echo "== parity (TP=N vs TP=1)"
timeout 420 python3 benchmarks/gpu_tp_parity.py $sizes 2>&1 | tee "$OUT/parity.log" | tail -25
grep -E '^\|' "$OUT/parity.log" >> "$OUT/summary.txt"

echo "== bench throughput (nano, $arch dummy weights)"
for tp in 1 $sizes; do
  timeout 600 python3 -m tokenmill bench throughput --workload nano --dummy-weights --arch "$arch" \
    --tensor-parallel-size "$tp" --output-json "$OUT/bench_tp$tp.json" 2>&1 \
    | tee "$OUT/bench_tp$tp.log" | tail -8
done
python3 - "$OUT" "$card" $sizes <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, card, sizes = Path(sys.argv[1]), sys.argv[2], [1] + [int(s) for s in sys.argv[3:]]
print("\n| card | TP | out tok/s | seconds | speed-up vs TP=1 | scaling efficiency |")
print("|---|---|---|---|---|---|")
base = None
for tp in sizes:
    f = out / f"bench_tp{tp}.json"
    if not f.exists():
        print(f"| {card} | {tp} | failed (see bench_tp{tp}.log) | | | |")
        continue
    r = json.loads(f.read_text())["results"][0]
    if tp == 1:
        base = r["output_tokens_per_s"]
    up = r["output_tokens_per_s"] / base if base else float("nan")
    print(f"| {card} | {tp} | {r['output_tokens_per_s']:,.0f} | {r['seconds']:.2f} | {up:.2f}x | {up / tp:.2f} |")
PY
cat "$OUT/summary.txt"
