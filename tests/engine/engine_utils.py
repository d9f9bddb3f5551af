"""Helpers shared by the engine tests: HF references, engines with a given KV size, recorders."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.scheduler import SchedulerOutput

# Architectures of tests/factories.py plus an odd-size Llama (head_dim 8, intermediate 77).
ARCH_CASES = {
    "llama": ("llama", {}),
    "llama-mha-tied": ("llama-mha-tied", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "opt": ("opt", {}),
    "opt-post-norm": ("opt-post-norm", {}),
    "gpt2": ("gpt2", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "phi3": ("phi3", {}),
    "mixtral": ("mixtral", {}),
    "qwen3-moe": ("qwen3-moe", dict(num_layers=3)),
    "llama-odd": (
        "llama",
        dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=77),
    ),
}

PROMPT_TEXTS = [
    "The quick brown fox",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. Once upon a time",
    "def add(a, b):",
    "Emoji and accents: café, naïve, 東京.",
    # two prompts sharing a prefix longer than a block, to exercise the prefix cache
    "Sorting prompts by length keeps batches full and padding small. The quick",
    "Sorting prompts by length keeps batches full and padding small. What is",
    "What is the capital of France?",
]

GREEDY = dict(temperature=0.0, ignore_eos=True)

# The engine under test runs here (float32); the transformers references always run on CPU.
# TOKENMILL_TEST_DEVICE=cuda runs the same tests through the GPU path (Triton kernels, CUDA
# graphs, overlapped steps).
DEVICE = os.environ.get("TOKENMILL_TEST_DEVICE", "cpu")


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy decoding, one prompt at a time (no padding), EOS ignored."""
    outs = []
    for ids in prompts:
        seq = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            min_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
        outs.append(seq[0, len(ids) :].tolist())
    return outs


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab_size]
    return model(torch.tensor([ids])).logits[0].float()


def block_bytes(model_dir: Path, block_size: int = 16, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of this checkpoint, computed independently from config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    c = c.get("text_config", c)
    hidden = c.get("hidden_size") or c["n_embd"]  # GPT-2 spells them its own way
    heads = c.get("num_attention_heads") or c["n_head"]
    layers = c.get("num_hidden_layers") or c["n_layer"]
    head_dim = c.get("head_dim") or hidden // heads
    kv_heads = c.get("num_key_value_heads") or heads
    return 2 * layers * block_size * kv_heads * head_dim * dtype_bytes


def make_llm(model_dir: Path, num_blocks: int | None = None, **kw) -> LLM:
    """An engine on DEVICE, float32; `num_blocks` sizes the KV cache to exactly that many blocks.

    Its scheduler is guarded: a step that schedules nothing while requests are unfinished and
    no sampled token is still in flight can only repeat forever (nothing changes between
    steps), so it fails the test at once instead of hanging it.
    """
    if num_blocks is not None:
        kw["kv_cache_memory"] = num_blocks * block_bytes(model_dir, kw.get("block_size", 16))
    kw.setdefault("device", DEVICE)
    kw.setdefault("dtype", "float32")
    llm = LLM(str(model_dir), **kw)
    if num_blocks is not None:
        assert llm.num_kv_blocks == num_blocks
    guard_progress(llm)
    return llm


def guard_progress(llm: LLM) -> None:
    sched = llm.scheduler
    inner = sched.schedule

    def schedule() -> SchedulerOutput:
        out = inner()
        in_flight = any(getattr(r, "num_inflight", 0) for r in sched.running)
        if out.is_empty and sched.has_unfinished() and not in_flight:
            held = {r.req_id: len(r.block_ids) for r in sched.waiting if r.block_ids}
            raise AssertionError(
                f"deadlock: nothing scheduled with {len(sched.running)} running and "
                f"{len(sched.waiting)} waiting requests, {sched.block_manager.num_free_blocks} "
                f"of {sched.block_manager.num_blocks} blocks free; waiting requests holding "
                f"blocks: {held}"
            )
        return out

    sched.schedule = schedule


def encode_all(llm: LLM, texts: list[str]) -> list[list[int]]:
    return [llm.encode(t) for t in texts]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw})


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


class ScheduleRecorder:
    """Wraps llm.scheduler.schedule to keep (running ids before, waiting ids before, output)."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.steps: list[tuple[list[str], list[str], SchedulerOutput]] = []
        sched = llm.scheduler
        inner = sched.schedule

        def schedule() -> SchedulerOutput:
            running = [r.req_id for r in sched.running]
            waiting = [r.req_id for r in sched.waiting]
            out = inner()
            self.steps.append((running, waiting, out))
            return out

        sched.schedule = schedule


def live_requests(llm: LLM) -> list:
    return list(llm.scheduler.running) + list(llm.scheduler.waiting)


def random_prompt(rng: random.Random, vocab_size: int, lo: int, hi: int) -> list[int]:
    # ids 5.. skip the special tokens (EOS would only matter with ignore_eos=False)
    return [rng.randrange(5, vocab_size) for _ in range(rng.randint(lo, hi))]


def drain(llm: LLM, max_steps: int = 2) -> list:
    """Step until nothing is unfinished (at most max_steps); return every output seen."""
    outs = []
    for _ in range(max_steps):
        if not llm.has_unfinished_requests():
            break
        outs += llm.step()
    assert not llm.has_unfinished_requests()
    return outs
