#!/usr/bin/env bash
# One device call that re-measures what the open issues ask of the GPU, about 7 minutes:
#   bash benchmarks/gpu_session.sh [PHASE ...]     PHASE: smoke serve structured w1 w2 (default
#                                                  these five), sweep (decode kernel launch
#                                                  configs), profile / profile-w1 (W2 / W1
#                                                  by step kind, each bin against its
#                                                  floor), w2-8b (W2 on llama-3.1-8b),
#                                                  structured-w2 (the JSON-schema cost on
#                                                  W2's shape with Qwen's vocabulary)
# in this order: correctness before speed. Each phase has its own time limit, so one that hangs
# cannot eat the call; its log is under $OUT (the device tool's folder, else out/gpu_session).
#
# The device's Python lacks the server and grammar packages: WHEELS (default .gpu/whl, cp312
# wheels from `pip download --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64`) are installed into /tmp/site once per warm machine. The serve and
# structured phases use the default model's shape with random weights, built from TOKENIZER
# (default .gpu/smol_tok: SmolLM2-135M-Instruct's config.json, generation_config.json and
# tokenizer files) by benchmarks/random_weights.py. structured-w2 needs QWEN_TOKENIZER (default
# .gpu/qwen_tok, from benchmarks/qwen_vocab_tokenizer.py). With the device tool, carry them:
#   carry [".gpu/whl", ".gpu/smol_tok", ".gpu/qwen_tok"]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.gpu/whl}
TOKENIZER=${TOKENIZER:-.gpu/smol_tok}
if [ ! -d /tmp/site ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card" | tee "$OUT/summary.txt"
if [ ! -f /tmp/smolr/config.json ]; then
  python3 benchmarks/random_weights.py "$TOKENIZER" /tmp/smolr > "$OUT/random_weights.log" 2>&1
fi

run() {  # run NAME LIMIT_S CMD...: the command's log to $OUT/NAME.log, its tail here
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name"
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "| $name | $rc | $(($(date +%s) - start)) |" >> "$OUT/summary.txt"
}

# the W1 / W2 presets of issue 8: qwen3-0.6b's shape, random weights made on the card
bench=(python3 -m tokenmill bench throughput --dummy-weights --arch qwen3-0.6b)
echo "| phase | exit | seconds |" >> "$OUT/summary.txt"
echo "|---|---|---|" >> "$OUT/summary.txt"

for phase in ${*:-smoke serve structured w1 w2}; do
  case $phase in
    smoke) run smoke 170 python3 benchmarks/gpu_smoke.py ;;
    serve) run serve 150 env OUT="$OUT/serve" python3 benchmarks/serve_alternating.py \
      --model /tmp/smolr --rounds 4 ;;
    structured) run structured 120 python3 benchmarks/structured_w2.py /tmp/smolr ;;
    structured-w2) run structured-w2 120 python3 benchmarks/structured_w2.py \
      "${QWEN_TOKENIZER:-.gpu/qwen_tok}" --arch qwen3-0.6b ;;
    w1) run w1 75 "${bench[@]}" --workload nano ;;
    w2) run w2 75 "${bench[@]}" --workload mixed --temperature 0.8 --top-p 0.95 ;;
    sweep) run sweep 150 env OUT="$OUT" python3 benchmarks/decode_sweep.py ;;
    profile) run profile 200 python3 benchmarks/w2_profile.py --profile-steps 100,250 ;;
    profile-w1) run profile-w1 150 python3 benchmarks/w2_profile.py --workload nano \
      --profile-steps 400,430 ;;
    w2-8b) run w2-8b 300 python3 -m tokenmill bench throughput --dummy-weights \
      --arch llama-3.1-8b --workload mixed --temperature 0.8 --top-p 0.95 ;;
    *) echo "unknown phase $phase (smoke serve structured structured-w2 w1 w2 sweep profile" \
      "profile-w1 w2-8b)" >&2 ;;
  esac
done
echo "== summary"
cat "$OUT/summary.txt"
