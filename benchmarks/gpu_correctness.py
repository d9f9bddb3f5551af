"""Correctness on the GPU, before any timing (BENCHMARKS.md: check first, then time).

1. float32: greedy output of tokenmill (Triton kernels, CUDA graphs) == transformers, token for
   token, on tiny random models of each architecture.
2. bfloat16, random-weight qwen3-0.6b: first-step logits vs transformers (max abs diff, top-1
   agreement) and the share of greedy continuation tokens that agree.
Prints a table; exits non-zero if (1) fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import ARCHS, make_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

BACKEND = sys.argv[1] if len(sys.argv) > 1 else "auto"  # auto | triton | torch
PROMPTS = [
    [(7 * i + 3 * j) % 300 + 5 for j in range(n)]
    for i, n in enumerate([3, 17, 33, 64, 5, 120, 48, 250, 1, 90])
]


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def tiny_gpu_model(arch: str, max_position_embeddings: int = 1024) -> Path:
    """A tiny float32 checkpoint of `arch` with head_dim 16: the Triton kernels take
    power-of-two head sizes (others fall back to the torch backend)."""
    heads = ARCHS[arch][1]["num_attention_heads"]
    return make_tiny_model(
        tempfile.mkdtemp(),
        arch=arch,
        max_position_embeddings=max_position_embeddings,
        hidden_size=16 * heads,
        head_dim=16,
    )


def tiny_gpu_llm(model_dir: Path, **kwargs) -> LLM:
    """The engine over a tiny checkpoint: float32 on the GPU, a 256 MiB KV cache."""
    return LLM(
        model=str(model_dir), dtype="float32", device="cuda", kv_cache_memory="256MiB", **kwargs
    )


def hf_reference(model_dir: Path):
    """transformers on the GPU with eager attention: the exact float32 reference (sdpa and
    flash attention drop Gemma 2's score soft-capping)."""
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).cuda()


def tiny_parity() -> dict:
    rows = {}
    for arch in ARCHS:
        d = tiny_gpu_model(arch)
        llm = tiny_gpu_llm(
            d, max_num_seqs=16, attention_backend=BACKEND, enforce_eager=BACKEND == "torch"
        )
        outs = llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
        )
        hf = hf_reference(d)
        same = sum(hf_greedy(hf, p, 24) == o.outputs[0].token_ids for p, o in zip(PROMPTS, outs))
        rows[arch] = f"{same}/{len(PROMPTS)}"
        del llm, hf
        torch.cuda.empty_cache()
    return rows


def qwen3_bf16(num_new: int = 64) -> dict:
    from tokenmill.bench.presets import make_dummy_checkpoint

    d = make_dummy_checkpoint("qwen3-0.6b", dtype="bfloat16", device="cuda")
    prompts = [
        [(11 * i + 5 * j) % 10000 for j in range(n)]
        for i, n in enumerate([100, 257, 513, 1000, 31, 700, 64, 900])
    ]
    llm = LLM(
        model=str(d),
        dtype="bfloat16",
        device="cuda",
        gpu_memory_utilization=0.5,
        skip_tokenizer_init=True,
        max_model_len=4096,
        attention_backend=BACKEND,
        enforce_eager=BACKEND == "torch",
    )
    outs = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True, logprobs=1),
        use_tqdm=False,
    )
    del llm
    torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda()
    agree = total = top1 = 0
    max_diff = 0.0
    for p, o in zip(prompts, outs):
        ours = o.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([p], device="cuda")).logits[0, -1].float()
        ref_lp = torch.log_softmax(logits, -1)
        first = o.outputs[0].logprobs[0]
        top1 += int(logits.argmax().item() == ours[0])
        max_diff = max(max_diff, abs(first[ours[0]].logprob - ref_lp[ours[0]].item()))
        ref = hf_greedy(hf, p, num_new)
        # agreement up to the first divergence, then count matching positions anyway
        agree += sum(a == b for a, b in zip(ours, ref))
        total += num_new
    return {
        "first_token_top1_agree": f"{top1}/{len(prompts)}",
        "first_token_logprob_max_abs_diff": round(max_diff, 4),
        "greedy_tokens_agree": f"{agree}/{total} ({100 * agree / total:.1f}%)",
    }


if __name__ == "__main__":
    tiny = tiny_parity()
    big = qwen3_bf16()
    print(json.dumps({"tiny_float32_greedy_parity": tiny, "qwen3_0.6b_bf16": big}, indent=2))
    sys.exit(0 if all(v.split("/")[0] == v.split("/")[1] for v in tiny.values()) else 1)
