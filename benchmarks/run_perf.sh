#!/usr/bin/env bash
# Issue 8 in one GPU call (< 8 minutes on an H200): correctness first, then W1 and W2 timed,
# one short table last.
#   bash benchmarks/run_perf.sh            (from the repo root or anywhere)
#   PEER_FLAGS= ...  W1 without the transformers peer (saves ~3 minutes of device time)
#   W2_PLAIN=1 ...   also W2 without top-p (the top-p overhead bar; ~1.5 min more)
#   W2_8B=1 ...      also W2 on the llama-3.1-8b shape (~3 min more)
# Logs and JSON go to $OUT (the device tool's output folder) or ./out/perf.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/perf}; mkdir -p "$OUT"
t_start=$(date +%s)
since() { echo "[$(( $(date +%s) - t_start )) s]"; }

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'

# The floor's inputs, measured once and given to every bench run.
bw= tf=
read -r bw tf < <(python3 - <<'PY'
import torch
from tokenmill.bench.roofline import measure_copy_bandwidth, measure_matmul_rate
print(f"{measure_copy_bandwidth('cuda') / 1e12:.3f} {measure_matmul_rate('cuda', torch.bfloat16) / 1e12:.0f}")
PY
)
echo "copy bandwidth (read + write) $bw TB/s, bf16 matmul $tf TFLOP/s $(since)"
floor_opts=()  # if the measurement failed, each bench measures for itself
[ -n "${tf:-}" ] && floor_opts=(--bandwidth "$bw" --tflops "$tf")

echo "== correctness: float32 greedy parity with graphs on mixed steps, top-p sanity"
timeout 200 python3 benchmarks/perf_correctness.py > "$OUT/correctness.log" 2>&1
correct=$?
tail -30 "$OUT/correctness.log"
echo "correctness exit $correct $(since)"

bench() {  # name, then bench throughput arguments
  local name=$1; shift
  echo "== $name: bench throughput $*"
  timeout "${BENCH_TIMEOUT:-300}" python3 -m tokenmill bench throughput --dummy-weights \
    ${floor_opts[@]+"${floor_opts[@]}"} --output-json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  tail -8 "$OUT/$name.log"
  echo "$name done $(since)"
}

bench W1 --workload nano --arch qwen3-0.6b ${PEER_FLAGS---peer hf}
bench W2 --workload mixed --arch qwen3-0.6b --temperature 0.8 --top-p 0.95
[ "${W2_PLAIN:-0}" = 1 ] && bench W2-plain --workload mixed --arch qwen3-0.6b --temperature 0.8
[ "${W2_8B:-0}" = 1 ] && bench W2-8b --workload mixed --arch llama-3.1-8b --temperature 0.8 --top-p 0.95

echo
python3 - "$OUT" "$card" "$correct" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, card, correct = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"card: {card}; correctness: {'OK' if correct == '0' else 'FAILED (exit ' + correct + ')'}")
print("| workload | engine | out tok/s | floor s | fraction | graph / eager steps | compiles in timed pass | start-up s |")
print("|---|---|---|---|---|---|---|---|")
for name in ("W1", "W2", "W2-plain", "W2-8b"):
    path = out / f"{name}.json"
    if not path.exists():
        if name in ("W1", "W2"):
            print(f"| {name} | (no result: see {name}.log) | | | | |")
        continue
    b = json.loads(path.read_text())
    floor, eng = b["floor"], b["engine"]
    for r in b["results"]:
        ours = r["name"] == "tokenmill"
        steps = f"{eng['graph_steps']} / {eng['eager_steps']}" if ours else "-"
        compiles = len(r.get("kernel_compiles", [])) if ours else "-"
        startup = f"{eng.get('startup_seconds', 0):.1f}" if ours else "-"
        print(f"| {name} {b['model']['architecture']} | {r['name']} | {r['output_tokens_per_s']:,.0f}"
              f" | {floor['seconds']:.2f} | {r['fraction_of_floor']:.2f} | {steps} | {compiles} | {startup} |")
PY
echo "total $(since)"
