"""Write random bf16 weights beside a checkpoint directory's config and tokenizer.

    python3 benchmarks/random_weights.py CONFIG_AND_TOKENIZER_DIR OUT_DIR

For the GPU machine, where the default model's 98 MB GGUF takes two calls to carry: its
config.json, generation_config.json and tokenizer files (3.5 MB) travel instead, and this
script gives them weights of the same shape. Speed does not depend on the values; a serving
run still detokenizes real tokens with the real tokenizer.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    print(f"random bf16 weights for {config.architectures} written to {out}")


if __name__ == "__main__":
    main()
