"""Host cost of a small decode step on the GPU (issue 8: W2's long tail runs hundreds of steps
of under 64 sequences, 3.5 ms each on an H200 where the weights alone read in 0.3 ms).

    PYTHONPATH=. python3 benchmarks/decode_host_profile.py [NUM_SEQS ...]

Per batch size: qwen3-0.6b random weights, NUM_SEQS requests of 300 prompt tokens, T 0.8;
after the prefill, 60 decode steps timed (wall per step, and host time in schedule / launch /
land), then 20 steps under torch.profiler: the CPU ops with the most self time per step and
the GPU's busy time per step. Prints the tables last.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams
from tokenmill.bench.presets import make_dummy_checkpoint


def phases(llm):
    acc = defaultdict(float)
    restore = []
    for obj, name in ((llm.scheduler, "schedule"), (llm.runner, "execute_async"), (llm, "_land")):
        fn = getattr(obj, name)

        def wrap(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] += time.perf_counter() - t0

        setattr(obj, name, wrap)
        restore.append((obj, name, fn))
    return acc, restore


def one(llm, num_seqs: int) -> list[str]:
    params = SamplingParams(temperature=0.8, ignore_eos=True, max_tokens=200)
    for i in range(num_seqs):
        llm.add_request(f"s{num_seqs}-{i}", [(7 * i + j) % 5000 + 1 for j in range(300)], params)
    while llm.scheduler.waiting or any(r.num_output_tokens < 2 for r in llm.scheduler.running):
        llm.step()
    acc, restore = phases(llm)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = 60
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    for obj, name, fn in restore:
        setattr(obj, name, fn)
    n = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            llm.step()
        torch.cuda.synchronize()
    while llm.has_unfinished_requests():
        llm.step()
    ka = prof.key_averages()
    kernels = [e for e in ka if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    busy = sum(e.self_device_time_total for e in kernels) / n / 1e3
    lines = [
        f"\n## {num_seqs} seqs: wall {wall:.2f} ms/step; GPU kernels {busy:.2f} ms/step; host "
        + ", ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in acc.items())
        + " ms/step",
        "| CPU op (self time) | ms/step | calls/step |",
        "|---|---|---|",
    ]
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:14]:
        lines.append(
            f"| {e.key[:60]} | {e.self_cpu_time_total / n / 1e3:.3f} | {e.count / n:.1f} |"
        )
    lines += ["| GPU kernel | ms/step | calls/step |", "|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]:
        lines.append(
            f"| {e.key[:60]} | {e.self_device_time_total / n / 1e3:.3f} | {e.count / n:.1f} |"
        )
    return lines


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [8, 32, 128]
    d = make_dummy_checkpoint("qwen3-0.6b", weights=False)
    llm = LLM(str(d), load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=False)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    out = []
    for n in sizes:
        out += one(llm, n)
    print(f"card {torch.cuda.get_device_name(0)}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
