"""Where a decode step's time goes: host work per phase vs. GPU forward time.

Runs a decode-heavy slice of the nano workload on a random-weight qwen3-0.6b and times each
phase of LLM.step with host clocks (synchronising after the forward pass so phases don't
overlap), plus CUDA-event time of the forward alone. Prints per-step means in ms.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.presets import make_dummy_checkpoint
from tokenmill.bench.workloads import nano_workload


def main(num_prompts: int = 256, max_tokens: int = 128) -> dict:
    d = make_dummy_checkpoint("qwen3-0.6b", dtype="bfloat16", device="cuda")
    llm = LLM(model=str(d), skip_tokenizer_init=True)
    wl = nano_workload()
    prompts = [r.prompt for r in wl.requests[:num_prompts]]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    for i, p in enumerate(prompts):
        llm.add_request(f"p{i}", p, params, stream=False)
    acc: dict[str, list[float]] = defaultdict(list)
    runner, sched = llm.runner, llm.scheduler
    while llm.has_unfinished_requests():
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        decode = all(s.num_new_tokens == 1 for s in out.seqs)
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        result = runner.execute(out)
        ev1.record()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        sched.update_from_output(out, result.sampled)
        llm._record_step(out, result)
        llm.output_processor.process(
            {s.req_id for s in out.seqs if s.sample},
            result.logprobs,
            time.monotonic(),
            sched.finish,
        )
        t3 = time.perf_counter()
        if decode and len(out.seqs) == num_prompts:
            acc["schedule_ms"].append((t1 - t0) * 1e3)
            acc["execute_wall_ms"].append((t2 - t1) * 1e3)
            acc["execute_gpu_ms"].append(ev0.elapsed_time(ev1))
            acc["update+output_ms"].append((t3 - t2) * 1e3)
    # prepare() alone, on the last full decode batch shape
    res = {k: round(sum(v) / len(v), 3) for k, v in acc.items() if v}
    res["decode_steps_measured"] = len(acc["schedule_ms"])
    res["batch"] = num_prompts
    return res


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:])), indent=2))
