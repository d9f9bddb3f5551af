"""Benchmark workloads: lists of (prompt, max_tokens), drawn the same way every time.

`nano` is exactly nano-vllm's bench.py draw (see shared/BENCHMARKS.md, workload W1):
seed 0; 256 prompts of U[100, 1024] random token ids in [0, 10000]; then 256 output lengths
U[100, 1024] from the same generator: 142,827 prompt and 133,966 output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random

WORKLOADS = ("nano", "random", "dataset")

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

    @property
    def num_prompt_tokens(self) -> int | None:
        if any(not r.prompt or not isinstance(r.prompt[0], int) for r in self.requests):
            return None
        return sum(len(r.prompt) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


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
    if workload == "random":
        return random_workload(
            input_len, output_len, num_prompts or DEFAULT_NUM_PROMPTS, vocab_size=vocab_size
        )
    if workload == "dataset":
        if not dataset:
            raise ValueError("--workload dataset needs --dataset FILE")
        return dataset_workload(str(dataset), max_tokens=output_len, limit=num_prompts)
    raise ValueError(f"workload must be one of {', '.join(WORKLOADS)} (got {workload!r})")
