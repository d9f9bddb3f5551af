#!/usr/bin/env bash
# Issue 12 §2 in one command on a machine with 2+ GPUs: `tokenmill generate` over the mixed
# workload (W2: 2,000 requests, log-normal prompt and output lengths, ignore_eos, temperature 0.8,
# top-p 0.95) written as a JSONL of token-id prompts, run with --data-parallel-size 1 and 2;
# correctness first (greedy rows of DP=2 equal DP=1's on 200 rows), then rows/s and output tok/s
# of each timed run (from its report: model load excluded) and the scaling ratio, one table last.
#   bash benchmarks/gpu_dp.sh
# Environment: SIZES ("1 2"; e.g. "1 2 4 8" on a bigger machine), NUM_PROMPTS (2000),
# MODEL (default: a dummy-weight qwen3-0.6b with a word-level tokenizer over its vocabulary;
# `default`: tokenmill's default model), GEN_FLAGS (more `generate` flags for every run).
# Logs, outputs and reports go to $OUT (the device tool's output folder) or ./out/gpu_dp.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_dp}; mkdir -p "$OUT"
SIZES=${SIZES:-1 2}; NUM_PROMPTS=${NUM_PROMPTS:-2000}; GEN_FLAGS=${GEN_FLAGS:-}
t_start=$(date +%s)
since() { echo "[$(( $(date +%s) - t_start )) s]"; }

nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "visible GPUs", torch.cuda.device_count())'

# The model and the workload file (vocab_size: the ids stay inside the model's vocabulary).
python3 - "$OUT" "${MODEL:-dummy}" <<'PY'
import sys
from pathlib import Path

out, which = Path(sys.argv[1]), sys.argv[2]
if which != "dummy":
    (out / "model_path").write_text("" if which == "default" else which)
    sys.exit()
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokenmill.bench.presets import make_dummy_checkpoint, preset_config

vocab_size = preset_config("qwen3-0.6b").vocab_size
path = make_dummy_checkpoint("qwen3-0.6b", dtype="bfloat16", device="auto")
# One word per id: any sampled id decodes (the rows carry token ids, so nothing is encoded).
tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0").save_pretrained(path)
(out / "model_path").write_text(str(path))
PY
model=$(cat "$OUT/model_path")
model_flag=(); [ -n "$model" ] && model_flag=(--model "$model")
echo "model: ${model:-the default model} $(since)"

python3 - "$OUT" "$NUM_PROMPTS" "$model" <<'PY'
import json, sys
from pathlib import Path

from tokenmill.bench.workloads import mixed_workload
from tokenmill.engine.model_source import resolve_model

out, num, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
model_dir, _ = resolve_model(model)
vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
wl = mixed_workload(num, vocab_size=min(10000, vocab_size))
with open(out / "mixed.jsonl", "w") as f:
    for i, r in enumerate(wl.requests):
        row = {"id": f"w2-{i}", "prompt": r.prompt, "sampling": {"max_tokens": r.max_tokens}}
        f.write(json.dumps(row) + "\n")
print(f"mixed workload: {len(wl.requests)} rows, {wl.num_prompt_tokens:,} prompt tokens, "
      f"{wl.num_output_tokens:,} output tokens")
PY

run() {  # name, size, input, then more generate flags
  local name=$1 size=$2 input=$3; shift 3
  echo "== $name: generate --data-parallel-size $size $*"
  local t0; t0=$(date +%s)
  timeout "${RUN_TIMEOUT:-900}" python3 -m tokenmill generate "$input" -o "$OUT/$name.jsonl" \
    "${model_flag[@]}" --data-parallel-size "$size" --ignore-eos --overwrite --quiet \
    $GEN_FLAGS "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(( $(date +%s) - t0 )) s with start-up" > "$OUT/$name.wall"
  tail -3 "$OUT/$name.log"
  echo "$name exit $rc $(since)"
}

# Correctness: greedy rows of two replicas equal one engine's, row for row.
head -200 "$OUT/mixed.jsonl" > "$OUT/check.jsonl"
run check-dp1 1 "$OUT/check.jsonl" --temperature 0
run check-dp2 2 "$OUT/check.jsonl" --temperature 0
same=FAILED; cmp -s "$OUT/check-dp1.jsonl" "$OUT/check-dp2.jsonl" && same=OK

for n in $SIZES; do
  run "dp$n" "$n" "$OUT/mixed.jsonl" --temperature 0.8 --top-p 0.95
done

echo
python3 - "$OUT" "$same" $SIZES <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, same, sizes = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
num_checked = (out / "check.jsonl").read_text().count("\n")
print(f"greedy rows, --data-parallel-size 2 vs 1 ({num_checked} rows): {same}")
print("| replicas | device | rows | s (w/o load) | s (with load) | rows/s | out tok/s | x one | efficiency |")
print("|---|---|---|---|---|---|---|---|---|")
base = None
for n in sizes:
    path = out / f"dp{n}.jsonl.report.json"
    if not path.exists():
        print(f"| {n} | (no report: see dp{n}.log) | | | | | | | |")
        continue
    r = json.loads(path.read_text())
    run = r["this_run"]
    tok_s = run["tokens_per_s"]["output"]
    base = tok_s if n == 1 else base
    ratio = tok_s / base if base else float("nan")
    wall = (out / f"dp{n}.wall").read_text().split()[0]
    print(f"| {n} | {r['device']} | {run['rows']:,} | {run['wall_time_s']:.1f} | {wall} | "
          f"{run['requests_per_s']:.1f} | {tok_s:,.0f} | {ratio:.2f} | {ratio / n:.2f} |")
PY
echo "total $(since)"
