"""Which kernels a full decode step spends its time in (torch.profiler, CUDA activity).

256 nano prompts on a random-weight qwen3-0.6b are prefilled, then N decode steps run under
the profiler. Prints the top kernels by total GPU time per step, and the host time per step.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams
from tokenmill.bench.presets import make_dummy_checkpoint
from tokenmill.bench.workloads import nano_workload

eager = "--eager" in sys.argv
d = make_dummy_checkpoint("qwen3-0.6b", dtype="bfloat16", device="cuda")
llm = LLM(model=str(d), skip_tokenizer_init=True, enforce_eager=eager)
prompts = [r.prompt for r in nano_workload().requests]
params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1000)
for i, p in enumerate(prompts):
    llm.add_request(f"p{i}", p, params, stream=False)
while any(r.num_output_tokens < 2 for r in llm.scheduler.running) or llm.scheduler.waiting:
    llm.step()
for _ in range(5):
    llm.step()
torch.cuda.synchronize()
steps = 20
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
ka = prof.key_averages()
rows = sorted((e for e in ka if e.device_time_total > 0), key=lambda e: -e.device_time_total)
gpu_total = sum(e.self_device_time_total for e in ka) / steps / 1e3
print(
    f"decode step (256 seqs, eager={eager}): wall {wall * 1e3:.2f} ms/step, "
    f"GPU kernels {gpu_total:.2f} ms/step"
)
print(f"{'kernel':<70} {'ms/step':>8} {'calls/step':>10}")
for e in rows[:18]:
    print(f"{e.key[:70]:<70} {e.self_device_time_total / steps / 1e3:8.3f} {e.count / steps:10.1f}")
