#!/usr/bin/env bash
# The default model's GGUF (94 MB) is over the device tool's 64 MiB a call, so GPU checks with
# it take two consecutive calls (the device's /tmp survives only while the machine stays warm,
# about 30 s). This script, run here, writes the two halves and the wheels the device lacks into
# .gpu/ (ignored by git):
#   bash benchmarks/default_model_for_device.sh
# Call 1, carry [".gpu/smol.part.aa"]:
#   mkdir -p /tmp/smol && cp .gpu/smol.part.aa /tmp/smol/ && <first measurement>
# Call 2 at once, carry [".gpu/smol.part.ab", ".gpu/whl"]:
#   cat /tmp/smol/smol.part.aa .gpu/smol.part.ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_stop_check.py --skip-tiny /tmp/smol/*.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl
gguf=$("$PY" -c 'from tokenmill.engine.model_source import default_model_path; print(default_model_path())')
# part aa (57 MiB) alone in call 1; ab (37 MiB) with the wheels (~17 MiB) in call 2: 64 MiB a call
split -b 60000000 "$gguf" .gpu/smol.part.
# pure-Python (and cp312) wheels the GPU machine lacks: gguf, the server stack, xgrammar
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  gguf fastapi starlette pydantic pydantic-core uvicorn h11 anyio typing-inspection \
  annotated-types annotated-doc typing-extensions prometheus-client opentelemetry-api \
  xgrammar apache-tvm-ffi uvloop httptools jsonschema jsonschema-specifications referencing \
  rpds-py attrs aiohttp multidict yarl frozenlist aiosignal propcache aiohappyeyeballs idna
ls -la .gpu .gpu/whl
