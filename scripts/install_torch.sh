#!/usr/bin/env bash
# Install torch into the given Python without dragging a multi-GB CUDA build onto a CPU machine.
#   scripts/install_torch.sh PYTHON
# Installs numpy first (torch built without it prints "Failed to initialize NumPy" on import).
# Keeps an already-installed torch >= 2.11. On a machine with an NVIDIA driver, installs the
# default (CUDA) build; otherwise the CPU build: TORCH_SPEC (default torch==2.13.0, which these
# machines serve as a local CPU wheel). Elsewhere, point pip at a CPU wheel index first, e.g.
#   PIP_INDEX_URL=<your CPU wheel index> scripts/install_torch.sh .venv/bin/python
set -euo pipefail
py=${1:-python3}
if "$py" - <<'PY' 2>/dev/null; then
import torch, sys
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PY
  echo "torch already installed: $("$py" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
"$py" -m pip install -q numpy
if command -v nvidia-smi >/dev/null 2>&1; then
  "$py" -m pip install -q "torch>=2.11"
else
  "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
