"""`tokenmill bench throughput`: offline generation speed, optionally beside a transformers peer.

Timing follows the anchors (nano-vllm's bench.py): one warm-up call first, model load excluded,
then one timed `LLM.generate` over the whole workload; figure of merit = output tokens / s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tokenmill.bench.workloads import Workload


@dataclass
class ThroughputResult:
    name: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    # Triton kernels compiled inside the timed pass (start-up cost billed as throughput)
    kernel_compiles: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def input_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "requests_per_s": self.requests_per_s,
            "input_tokens_per_s": self.input_tokens_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_tokenmill(llm, workload: Workload) -> ThroughputResult:
    from tokenmill import SamplingParams
    from tokenmill.kernels.jit_watch import compiled_kernels

    params = [
        SamplingParams(
            temperature=workload.temperature,
            top_p=workload.top_p,
            top_k=workload.top_k,
            ignore_eos=workload.ignore_eos,
            max_tokens=r.max_tokens,
        )
        for r in workload.requests
    ]
    prompts = [
        llm.encode_chat(r.prompt) if r.prompt and isinstance(r.prompt[0], dict) else r.prompt
        for r in workload.requests
    ]
    # warm-up with the workload's sampling, so its kernels are compiled before the clock starts
    warm = SamplingParams(
        temperature=workload.temperature, top_p=workload.top_p, top_k=workload.top_k, max_tokens=8
    )
    llm.generate([prompts[0]], warm, use_tqdm=False)
    _sync()
    with compiled_kernels() as compiles:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        _sync()
        seconds = time.perf_counter() - t0
    return ThroughputResult(
        "tokenmill",
        len(outs),
        sum(len(o.prompt_token_ids) for o in outs),
        sum(len(c.token_ids) for o in outs for c in o.outputs),
        seconds,
        compiles,
    )


def run_hf_peer(model_dir, workload: Workload, dtype, device) -> ThroughputResult:
    """transformers' continuous batching (`generate_batch`, attn "paged|sdpa"), same weights.

    generate_batch takes one max_new_tokens for all requests, so the peer generates the
    workload's mean output length for every prompt: same prompts, same total output tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = (
        AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="paged|sdpa", dtype=dtype
        )
        .to(device)
        .eval()
    )
    prompts = [r.prompt for r in workload.requests]
    if any(not p or not isinstance(p[0], int) for p in prompts):
        raise ValueError("the transformers peer runs token-id workloads (nano, random)")
    mean_out = round(workload.num_output_tokens / len(prompts))
    cfg = GenerationConfig(
        max_new_tokens=mean_out, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    model.generate_batch(
        inputs=prompts[:4],
        generation_config=GenerationConfig(
            max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0
        ),
    )  # warm-up
    _sync()
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=cfg)
    _sync()
    seconds = time.perf_counter() - t0
    n_out = sum(len(o.generated_tokens) for o in outs.values())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ThroughputResult(
        "transformers generate_batch", len(outs), sum(len(p) for p in prompts), n_out, seconds
    )


def card_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
