"""Benchmark workloads: lists of (prompt, max_tokens), drawn the same way every time.

`nano` is exactly nano-vllm's bench.py draw (see shared/BENCHMARKS.md, workload W1):
seed 0; 256 prompts of U[100, 1024] random token ids in [0, 10000]; then 256 output lengths
U[100, 1024] from the same generator: 142,827 prompt and 133,966 output tokens.

`mixed` looks like a batch job (workload W2 with --temperature 0.8 --top-p 0.95): 2,000 requests,
log-normal prompt lengths (median 300, clipped to 16-4,000) and output lengths (median 150,
clipped to 8-2,000), random token ids, ignore_eos; more requests than slots and a long tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from random import Random

WORKLOADS = ("nano", "mixed", "random", "dataset")

# The workload options' defaults, for `bench throughput` and `bench serve` alike.
DEFAULT_NUM_PROMPTS = 256
DEFAULT_INPUT_LEN = 1024  # random workload: prompt tokens
DEFAULT_OUTPUT_LEN = 128  # random / dataset workloads: tokens to generate


@dataclass
class BenchRequest:
    """One request of a workload: a prompt (token ids or text) and how many tokens to generate."""

    prompt: list[int] | str | list[dict]  # token ids, text, or chat messages
    max_tokens: int


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    ignore_eos: bool = True
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1

    @property
    def num_prompt_tokens(self) -> int | None:
        if any(not r.prompt or not isinstance(r.prompt[0], int) for r in self.requests):
            return None
        return sum(len(r.prompt) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def prompt_lens(self) -> list[int] | None:
        if self.num_prompt_tokens is None:
            return None
        return [len(r.prompt) for r in self.requests]


def nano_workload(
    num_prompts: int = 256, max_input_len: int = 1024, max_output_len: int = 1024
) -> Workload:
    """nano-vllm bench.py: `seed(0)`, prompts first, then max_tokens, one generator."""
    rng = Random(0)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))]
        for _ in range(num_prompts)
    ]
    max_tokens = [rng.randint(100, max_output_len) for _ in range(num_prompts)]
    reqs = [BenchRequest(p, m) for p, m in zip(prompts, max_tokens)]
    return Workload("nano", reqs, ignore_eos=True, temperature=0.6)


def _lognormal_len(rng: Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def mixed_workload(num_prompts: int = 2000, vocab_size: int = 10000, seed: int = 0) -> Workload:
    """Log-normal prompt / output lengths (sigma 1: a tail past 10x the median), fixed seed."""
    rng = Random(seed)
    # lengths first, then ids: the lengths do not depend on vocab_size
    lens = [
        (_lognormal_len(rng, 300, 1.0, 16, 4000), _lognormal_len(rng, 150, 1.0, 8, 2000))
        for _ in range(num_prompts)
    ]
    reqs = [BenchRequest([rng.randrange(vocab_size) for _ in range(p)], o) for p, o in lens]
    return Workload("mixed", reqs, ignore_eos=True, temperature=0.6)


def random_workload(
    input_len: int, output_len: int, num_prompts: int, vocab_size: int = 10000, seed: int = 0
) -> Workload:
    """Fixed-length random token prompts: `--workload random`."""
    rng = Random(seed)
    reqs = [
        BenchRequest([rng.randint(0, vocab_size - 1) for _ in range(input_len)], output_len)
        for _ in range(num_prompts)
    ]
    return Workload("random", reqs, ignore_eos=True, temperature=0.6)


def dataset_workload(path: str, max_tokens: int = 128, limit: int | None = None) -> Workload:
    """Text prompts from any file `tokenmill generate` accepts (`--dataset FILE`)."""
    from tokenmill.io.readers import iter_prompts  # lazy: pyarrow / datasets

    reqs = []
    for prompt in iter_prompts(path):
        reqs.append(BenchRequest(prompt, max_tokens))
        if limit is not None and len(reqs) >= limit:
            break
    return Workload("dataset", reqs, ignore_eos=False, temperature=0.6)


def build_workload(
    workload: str,
    dataset: str | None = None,
    num_prompts: int | None = None,
    input_len: int = DEFAULT_INPUT_LEN,
    output_len: int = DEFAULT_OUTPUT_LEN,
    vocab_size: int = 10000,
) -> Workload:
    """The workloads `bench throughput` and `bench serve` offer, by name."""
    if dataset is not None and workload != "dataset":
        workload = "dataset"
    if workload == "nano":
        return nano_workload(num_prompts or DEFAULT_NUM_PROMPTS)
    if workload == "mixed":
        return mixed_workload(num_prompts or 2000, vocab_size=vocab_size)
    if workload == "random":
        return random_workload(
            input_len, output_len, num_prompts or DEFAULT_NUM_PROMPTS, vocab_size=vocab_size
        )
    if workload == "dataset":
        if not dataset:
            raise ValueError("--workload dataset needs --dataset FILE")
        return dataset_workload(str(dataset), max_tokens=output_len, limit=num_prompts)
    raise ValueError(f"workload must be one of {', '.join(WORKLOADS)} (got {workload!r})")
