"""The Triton kernels inside the engine (attention with sliding windows and soft-capped
scores; the layer kernels, q/k norm + rotary + KV write fused), on CPU through the Triton
interpreter: greedy tokens equal transformers'.

The interpreter must be switched on before triton compiles anything, so the engine runs in a
subprocess with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from engine_utils import PROMPT_TEXTS

NEW_TOKENS = 12

RUN = """
import json, sys
from tokenmill import LLM, SamplingParams
model_dir, block_size, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model_dir, device="cpu", dtype="float32", attention_backend="triton",
          block_size=block_size, max_num_batched_tokens=budget)
assert llm.runner.backend.name == "triton"
attn = [m for m in llm.runner.model.modules() if hasattr(m, "fused_prep")]
assert attn and all(m.fused_prep and m.fused is not None for m in attn), "not the fused path"
# the GPU's start-up kernel warm-up (decode row + chunks of 1..64 tokens) reads the zeroed cache
# and writes nothing: the cache stays zero and the tokens below still match transformers
llm.runner.warm_up_kernels()
assert not llm.runner.kv_cache.any()
prompts = [llm.encode(t) for t in json.loads(sys.argv[4])]
params = SamplingParams(temperature=0, max_tokens=int(sys.argv[5]), ignore_eos=True)
outs = llm.generate(prompts, params, use_tqdm=False)
print(json.dumps({"prompts": prompts, "tokens": [o.outputs[0].token_ids for o in outs]}))
"""


@pytest.mark.parametrize(
    "case, block_size, budget",
    [
        ("gemma2", 16, 8192),  # windows, soft-capping, no q/k norm
        ("gemma3", 4, 7),  # Gemma q/k norm; small blocks + chunked prefill
        ("qwen3", 16, 8192),  # Llama-style q/k norm
        ("gpt2-hd16", 16, 8192),  # no rotary, no q/k norm (3 heads of 16: a power of two)
    ],
)
def test_models_through_the_triton_kernels(
    case, block_size, budget, arch_dir, tiny_model_factory, hf_reference
):
    if case == "gpt2-hd16":
        model_dir = tiny_model_factory("gpt2", num_attention_heads=3)
    else:
        model_dir = arch_dir(case)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [
        str(model_dir),
        str(block_size),
        str(budget),
        json.dumps(PROMPT_TEXTS[:6]),
        str(NEW_TOKENS),
    ]
    out = subprocess.run(
        [sys.executable, "-c", RUN, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tokens"] == hf_reference(model_dir, got["prompts"], NEW_TOKENS)
