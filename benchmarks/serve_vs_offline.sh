#!/usr/bin/env bash
# Issue 9's bar in one script: `bench serve` against `tokenmill serve` vs `bench throughput`,
# same model, workload and card; prints the output tok/s ratio (bar: >= 0.85) and the
# TTFT / TPOT / ITL percentiles, plus the bench client's own ceiling (an instant server).
#   bash benchmarks/serve_vs_offline.sh
# Environment: MODEL (default: tokenmill's default model), WORKLOAD (nano), PORT (8765),
# ENGINE_FLAGS (engine flags for both sides; default --no-prefix-caching, see below), WL_FLAGS
# (workload flags
# for both, e.g. "--num-prompts 64 --input-len 128 --output-len 64"), SERVE_FLAGS (more
# `tokenmill serve` flags), BOTH=1 (also measure --in-process-engine), PYSPY=1 (sample the
# offline run and the server's processes with py-spy, raw stacks under $OUT).
# The CPU seconds of each process during the timed `bench serve` (and each offline run, model
# load included) go to cpu_NAME.txt, with the machine's busy / stolen CPU and the container's
# CPU-quota throttling: timings on a shared host vary 2-3x between runs (benchmarks/RESULTS.md).
# Logs and JSON go to $OUT (the device tool's output folder) or ./out/serve_vs_offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/serve_vs_offline}; mkdir -p "$OUT"
WORKLOAD=${WORKLOAD:-nano}; PORT=${PORT:-8765}; SERVE_FLAGS=${SERVE_FLAGS:-}
# The prefix cache is off on both sides by default: nano sends the same prompts again in the
# second serve pass, which would otherwise reuse the first pass's KV (seen: TTFT 348 vs 868 ms,
# no eager steps) and read as a faster server. ENGINE_FLAGS= (empty) keeps it on.
ENGINE_FLAGS=${ENGINE_FLAGS---no-prefix-caching}; WL_FLAGS=${WL_FLAGS:-}
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

spy=()
if [ "${PYSPY:-0}" = 1 ]; then
  spy=(py-spy record --nonblocking --rate 250 --threads --idle --format raw -o "$OUT/pyspy_offline.txt" --)
fi
offline() {  # name: bench throughput on the same model and workload
  echo "== bench throughput ($WORKLOAD, $1)"
  python3 benchmarks/proc_cpu.py snap "$OUT/cpu0.json"
  "${spy[@]}" python3 -m tokenmill bench throughput --workload "$WORKLOAD" $WL_FLAGS "${model_flag[@]}" \
    $ENGINE_FLAGS --output-json "$OUT/offline_$1.json" 2>&1 | tee "$OUT/offline_$1.log" | tail -8
  python3 benchmarks/proc_cpu.py snap "$OUT/cpu1.json"
  python3 benchmarks/proc_cpu.py diff "$OUT/cpu0.json" "$OUT/cpu1.json" | tee "$OUT/cpu_offline_$1.txt"
  spy=()  # py-spy samples the first offline run only
}
offline first

echo "== client ceiling: bench serve against an instant server"
python3 benchmarks/instant_server.py --port $((PORT + 1)) & pids+=($!)
wait_up "http://127.0.0.1:$((PORT + 1))" 60
python3 -m tokenmill bench serve --url "http://127.0.0.1:$((PORT + 1))" --workload "$WORKLOAD" \
  $WL_FLAGS --output-json "$OUT/ceiling.json" > "$OUT/ceiling.log" 2>&1
kill "${pids[-1]}"

scrape() {  # url: the engine's step counters from /metrics
  python3 -c "import httpx,sys; print(httpx.get(sys.argv[1] + '/metrics').text)" "$1" \
    | grep -E '^tokenmill:(engine_steps|graph_steps|eager_steps|scheduled_seqs|kernel_compiles)' || true
}

serve_once() {  # name, extra serve flags...
  local name=$1; shift
  echo "== tokenmill serve $* ($name) + bench serve"
  TOKENMILL_CORE_TRACE="$OUT/trace_$name.jsonl" \
  python3 -m tokenmill serve "${model_flag[@]}" --port "$PORT" --log-level warning \
    $ENGINE_FLAGS $SERVE_FLAGS "$@" > "$OUT/serve_$name.log" 2>&1 & pids+=($!)
  local srv=$!
  wait_up "http://127.0.0.1:$PORT" 900
  # warm-up (first kernels, CUDA graphs), not measured
  python3 -m tokenmill bench serve --url "http://127.0.0.1:$PORT" --workload random \
    --num-prompts 32 --input-len 128 --output-len 32 > /dev/null 2>&1 || true
  scrape "http://127.0.0.1:$PORT" > "$OUT/metrics_${name}_0.txt"
  local spy_pid=
  if [ "${PYSPY:-0}" = 1 ]; then
    py-spy record --pid "$srv" --subprocesses --nonblocking --rate 250 --threads --idle \
      --format raw -o "$OUT/pyspy_$name.txt" > "$OUT/pyspy_$name.log" 2>&1 & spy_pid=$!
    sleep 2
  fi
  python3 benchmarks/proc_cpu.py snap "$OUT/cpu0.json"
  python3 -m tokenmill bench serve --url "http://127.0.0.1:$PORT" --workload "$WORKLOAD" \
    $WL_FLAGS --output-json "$OUT/serve_$name.json" 2>&1 | tee "$OUT/bench_serve_$name.log" | tail -20
  python3 benchmarks/proc_cpu.py snap "$OUT/cpu1.json"
  python3 benchmarks/proc_cpu.py diff "$OUT/cpu0.json" "$OUT/cpu1.json" | tee "$OUT/cpu_$name.txt"
  if [ -n "$spy_pid" ]; then kill -INT "$spy_pid"; wait "$spy_pid" || true; fi
  scrape "http://127.0.0.1:$PORT" > "$OUT/metrics_${name}_1.txt"
  # the same workload again: kernels compiled for its shapes during the first pass are warm
  python3 -m tokenmill bench serve --url "http://127.0.0.1:$PORT" --workload "$WORKLOAD" \
    $WL_FLAGS --output-json "$OUT/serve_${name}_again.json" > "$OUT/bench_serve_${name}_again.log" 2>&1
  scrape "http://127.0.0.1:$PORT" > "$OUT/metrics_${name}_2.txt"
  kill -TERM "$srv"; wait "$srv" || true
}
serve_once engine_process
if [ "${BOTH:-0}" = 1 ]; then serve_once in_process --in-process-engine; fi
# Offline again after the servers: on a shared host the same run varies by 30% between calls,
# so serve is compared with the faster of the two offline runs around it.
offline last

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = [json.loads((out / f"offline_{n}.json").read_text())["results"][0]["output_tokens_per_s"]
        for n in ("first", "last") if (out / f"offline_{n}.json").exists()]
offline = max(runs)
ceiling = json.loads((out / "ceiling.json").read_text())["output_token_throughput"]
print(f"offline (bench throughput) before / after the servers: "
      f"{' / '.join(f'{r:,.0f}' for r in runs)} output tok/s; serve is compared with {offline:,.0f}")
print(f"bench serve client ceiling (instant server): {ceiling:,.0f} output tok/s")
def counters(path):
    vals = {}
    for line in path.read_text().splitlines():
        name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
        vals[name.removeprefix("tokenmill:").removesuffix("_total")] = value
    return vals
for path in sorted(out.glob("serve_*.json")):
    s = json.loads(path.read_text())
    name = path.stem.removeprefix("serve_")
    base, k = (name.removesuffix("_again"), 2) if name.endswith("_again") else (name, 1)
    try:
        a, b = counters(out / f"metrics_{base}_{k - 1}.txt"), counters(out / f"metrics_{base}_{k}.txt")
        d = {key: b[key] - a.get(key, 0.0) for key in b}
        print(f"{path.stem}: engine steps {d['engine_steps']:.0f} (graph {d['graph_steps']:.0f}, "
              f"eager {d['eager_steps']:.0f}), mean batch {d['scheduled_seqs'] / max(d['engine_steps'], 1):.1f}, "
              f"{1e3 * s['duration_s'] / max(d['engine_steps'], 1):.2f} ms of the run per step, "
              f"{d.get('kernel_compiles', 0):.0f} kernel compiles")
    except (OSError, KeyError, ValueError, IndexError) as e:
        print(f"{path.stem}: no engine counters ({e!r})")
    ratio = s["output_token_throughput"] / offline
    print(f"{path.stem}: {s['output_token_throughput']:,.0f} output tok/s, "
          f"serve/offline = {ratio:.2f} (bar 0.85: {'met' if ratio >= 0.85 else 'NOT met'}); "
          f"{s['successful_requests']} ok, {s['failed_requests']} failed")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "admission_ms"):
        v = s.get(key)
        if v is None:
            continue
        print(f"  {key[:-3].upper():9s} ms  mean {v['mean']:8.1f}  median {v['median']:8.1f}"
              f"  p99 {v['p99']:8.1f}")
    if "all_admitted_s" in s:
        print(f"  all requests admitted by {s['all_admitted_s']:.2f} s")
PY

python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
# The engine core's own timeline (TOKENMILL_CORE_TRACE): one segment per burst of work.
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("trace_*.jsonl")):
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    segs, cur = [], []
    for r in rows:
        if cur and r["t"] - cur[-1]["t"] - (cur[-1]["apply_ms"] + cur[-1]["step_ms"]) / 1e3 > 0.5:
            segs.append(cur); cur = []
        cur.append(r)
    segs.append(cur)
    for i, seg in enumerate(segs):
        t0, adds, total = seg[0]["t"], 0, sum(r["adds"] for r in seg)
        all_in = next((r["t"] - t0 for r in seg if (adds := adds + r["adds"]) >= total), 0.0)
        steps = [r for r in seg if r["step_ms"] > 0]
        step_ms = sum(r["step_ms"] for r in steps)
        span = seg[-1]["t"] - t0 + seg[-1]["step_ms"] / 1e3
        print(f"{path.stem} burst {i}: {span:.2f} s, {len(steps)} steps, {total} adds (all in by "
              f"{all_in:.2f} s), stepping {step_ms / 1e3:.2f} s ({step_ms / max(len(steps), 1):.2f} ms a "
              f"step), applying adds {sum(r['apply_ms'] for r in seg) / 1e3:.2f} s, mean running "
              f"{sum(r['running'] for r in steps) / max(len(steps), 1):.0f}, "
              f"{(seg[-1].get('minflt', 0) - seg[0].get('minflt', 0)) / max(len(steps), 1):.0f} "
              f"page faults and {seg[-1].get('sys_s', 0) - seg[0].get('sys_s', 0):.2f} s system CPU")
PY
