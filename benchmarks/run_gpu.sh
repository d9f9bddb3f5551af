#!/usr/bin/env bash
# Everything one GPU measurement needs, in one call (build, check, time; short table last).
#   bash benchmarks/run_gpu.sh [--no-peer] [--quick]
# Logs go to $OUT (the device tool's output folder) or ./out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
peer="--peer hf"; quick=0
for a in "$@"; do case $a in --no-peer) peer="";; --quick) quick=1;; esac; done
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card" | tee "$OUT/summary.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/summary.txt"

bw=$(python3 benchmarks/copy_bandwidth.py)
echo "copy bandwidth (read+write): $bw TB/s" | tee -a "$OUT/summary.txt"


echo "== correctness"
python3 benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/correctness.log" | tail -25
python3 benchmarks/gpu_stop_check.py ${SMOL_GGUF:-} 2>&1 | tee "$OUT/stop_check.log" | tail -12

if [ $quick = 0 ]; then
  echo "== step profile"
  python3 benchmarks/step_profile.py 2>&1 | tee "$OUT/step_profile.log" | tail -12
fi

echo "== bench throughput (nano, qwen3-0.6b dummy weights)"
python3 -m tokenmill bench throughput --workload nano --dummy-weights --arch qwen3-0.6b $peer \
  --bandwidth "$bw" --output-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -12
python3 - "$OUT/bench.json" "$card" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
b = json.load(open(sys.argv[1]))
floor = b["floor"]["seconds"]
tm = b["results"][0]; peer = b["results"][1] if len(b["results"]) > 1 else None
print(f"| card | tokenmill out tok/s | HF peer out tok/s | ratio | floor s | tokenmill s | fraction of floor |")
print(f"|---|---|---|---|---|---|---|")
ratio = f"{tm['output_tokens_per_s'] / peer['output_tokens_per_s']:.1f}x" if peer else "-"
ptxt = f"{peer['output_tokens_per_s']:,.0f}" if peer else "-"
print(f"| {sys.argv[2]} | {tm['output_tokens_per_s']:,.0f} | {ptxt} | {ratio} | {floor:.2f} | {tm['seconds']:.2f} | {floor / tm['seconds']:.2f} |")
PY

if [ "${KERNEL_TESTS:-1}" = 1 ]; then
  echo "== kernel tests on the GPU (last: the figures above come back even if time runs out)"
  timeout 200 python3 -m pytest tests/kernels -q -x 2>&1 | tee "$OUT/kernel_tests.log" | tail -3
fi
cat "$OUT/summary.txt"
