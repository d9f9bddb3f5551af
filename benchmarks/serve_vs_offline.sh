#!/usr/bin/env bash
# Issue 9's bar in one script: `bench serve` against `tokenmill serve` vs `bench throughput`,
# same model, workload and card; prints the output tok/s ratio (bar: >= 0.85) and the
# TTFT / TPOT / ITL percentiles, plus the bench client's own ceiling (an instant server).
#   bash benchmarks/serve_vs_offline.sh
# Environment: MODEL (default: tokenmill's default model), WORKLOAD (nano), PORT (8765),
# ENGINE_FLAGS (engine flags for both sides, e.g. "--device cpu"), WL_FLAGS (workload flags
# for both, e.g. "--num-prompts 64 --input-len 128 --output-len 64"), SERVE_FLAGS (more
# `tokenmill serve` flags), BOTH=1 (also measure --in-process-engine).
# Logs and JSON go to $OUT (the device tool's output folder) or ./out/serve_vs_offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/serve_vs_offline}; mkdir -p "$OUT"
WORKLOAD=${WORKLOAD:-nano}; PORT=${PORT:-8765}; SERVE_FLAGS=${SERVE_FLAGS:-}
ENGINE_FLAGS=${ENGINE_FLAGS:-}; WL_FLAGS=${WL_FLAGS:-}
model_flag=(); if [ -n "${MODEL:-}" ]; then model_flag=(--model "$MODEL"); fi
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

wait_up() {  # url seconds
  for _ in $(seq "$2"); do
    if python3 -c "import httpx,sys; sys.exit(httpx.get('$1/health').status_code != 200)" \
        2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "server at $1 did not come up" >&2; return 1
}

echo "== bench throughput ($WORKLOAD)"
python3 -m tokenmill bench throughput --workload "$WORKLOAD" $WL_FLAGS "${model_flag[@]}" \
  $ENGINE_FLAGS --output-json "$OUT/offline.json" 2>&1 | tee "$OUT/offline.log" | tail -8

echo "== client ceiling: bench serve against an instant server"
python3 benchmarks/instant_server.py --port $((PORT + 1)) & pids+=($!)
wait_up "http://127.0.0.1:$((PORT + 1))" 60
python3 -m tokenmill bench serve --url "http://127.0.0.1:$((PORT + 1))" --workload "$WORKLOAD" \
  $WL_FLAGS --output-json "$OUT/ceiling.json" > "$OUT/ceiling.log" 2>&1
kill "${pids[-1]}"

serve_once() {  # name, extra serve flags...
  local name=$1; shift
  echo "== tokenmill serve $* ($name) + bench serve"
  python3 -m tokenmill serve "${model_flag[@]}" --port "$PORT" --log-level warning \
    $ENGINE_FLAGS $SERVE_FLAGS "$@" > "$OUT/serve_$name.log" 2>&1 & pids+=($!)
  local srv=$!
  wait_up "http://127.0.0.1:$PORT" 900
  # warm-up (first kernels, CUDA graphs), not measured
  python3 -m tokenmill bench serve --url "http://127.0.0.1:$PORT" --workload random \
    --num-prompts 32 --input-len 128 --output-len 32 > /dev/null 2>&1 || true
  python3 -m tokenmill bench serve --url "http://127.0.0.1:$PORT" --workload "$WORKLOAD" \
    $WL_FLAGS --output-json "$OUT/serve_$name.json" 2>&1 | tee "$OUT/bench_serve_$name.log" | tail -20
  kill -TERM "$srv"; wait "$srv" || true
}
serve_once engine_process
if [ "${BOTH:-0}" = 1 ]; then serve_once in_process --in-process-engine; fi

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
offline = json.loads((out / "offline.json").read_text())["results"][0]["output_tokens_per_s"]
ceiling = json.loads((out / "ceiling.json").read_text())["output_token_throughput"]
print(f"offline (bench throughput): {offline:,.0f} output tok/s")
print(f"bench serve client ceiling (instant server): {ceiling:,.0f} output tok/s")
for path in sorted(out.glob("serve_*.json")):
    s = json.loads(path.read_text())
    ratio = s["output_token_throughput"] / offline
    print(f"{path.stem}: {s['output_token_throughput']:,.0f} output tok/s, "
          f"serve/offline = {ratio:.2f} (bar 0.85: {'met' if ratio >= 0.85 else 'NOT met'}); "
          f"{s['successful_requests']} ok, {s['failed_requests']} failed")
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        v = s[key]
        print(f"  {key[:-3].upper():5s} ms  mean {v['mean']:8.1f}  median {v['median']:8.1f}"
              f"  p99 {v['p99']:8.1f}")
PY
