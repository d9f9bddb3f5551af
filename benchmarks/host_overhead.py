"""Host (Python) work per decode step of 256 sequences, phase by phase, without a GPU.

The model is a 1-layer toy so its forward is cheap; the bookkeeping (scheduling, flattening
the batch, landing tokens, building outputs) is what a 256-sequence decode step costs the host
whatever the model. On a GPU, overlapped steps hide this work as long as it stays below the
step's GPU time (6.7 ms for qwen3-0.6b at 256 sequences on an H200, benchmarks/RESULTS.md).
    python3 benchmarks/host_overhead.py
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import make_tiny_model  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402


def main(num_seqs: int = 256, steps: int = 40) -> None:
    d = make_tiny_model(
        tempfile.mkdtemp(),
        arch="qwen3",
        hidden_size=64,
        head_dim=16,
        num_layers=1,
        intermediate_size=32,
        max_position_embeddings=2048,
    )
    llm = LLM(model=str(d), kv_cache_memory="256MiB", max_num_seqs=num_seqs)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 8)
    for i in range(num_seqs):
        prompt = [rng.randint(5, 300) for _ in range(rng.randint(100, 300))]
        llm.add_request(str(i), prompt, params, stream=False)
    while any(r.num_output_tokens < 1 for r in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()  # prefill everything first: what follows are pure decode steps
    acc: dict[str, float] = defaultdict(float)

    def timed(obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def call(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t

        setattr(obj, name, call)

    timed(llm.scheduler, "schedule", "schedule")
    timed(llm.runner, "prepare", "prepare (flatten the batch)")
    timed(llm.runner.model, "forward", "model forward (toy, excluded)")
    timed(llm.scheduler, "update_from_output", "update_from_output")
    timed(llm.output_processor, "process", "output processing")
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    total = (time.perf_counter() - t0) / steps * 1e3
    forward = acc["model forward (toy, excluded)"] / steps * 1e3
    for key, seconds in acc.items():
        print(f"{key:32s} {seconds / steps * 1e3:6.2f} ms/step")
    print(
        f"{'host work per step (all but forward)':32s} {total - forward:6.2f} ms/step "
        f"({num_seqs} sequences)"
    )


if __name__ == "__main__":
    main()
