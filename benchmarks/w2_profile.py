"""Where W2's (or W1's) time goes (issue 8): every step of `bench throughput --workload mixed`
timed and binned, host phases timed, each bin set against its own floor, and a torch.profiler
window of kernels at steady state.

    PYTHONPATH=. python3 benchmarks/w2_profile.py [--workload mixed|nano] [--top-p 0.95]
                                                  [--also-plain] [--arch A]

A bin's floor is the sum of its steps' floors, each step's the roofline of that step alone:
max(bytes / copy rate, FLOPs / matmul rate) with the weights read once, every KV entry its
rows attend to read once and its new entries written, and the dense, head and attention FLOPs
(tokenmill/bench/roofline.py's step_floor). A bin far from 1.0 is where the run loses.

The run is W2 as the bench runs it (qwen3-0.6b random weights, 2,000 log-normal requests,
T 0.8, card-sized limits) driven step by step: per step, the host time of schedule /
launch (execute_async) / land (read back + outputs), the step's wall time, its tokens, and
whether it replayed a graph, and its device time (CUDA events recorded before and after its
launch). NOTE: that device time includes the device idling while the host is still inside the
launch, so it tells device-bound steps only from steps that wait on the host outside their
launch; the profiler window's kernel total against its wall is the direct check. Steps
overlap on the GPU, so a step's wall is the device time when the device is the bottleneck and
the host time when the host is. Keep the profiler window (--profile-steps) away from the steps
you read: it slows their host side. `--sync-debug` counts the host-device synchronisations
torch sees (torch.cuda.set_sync_debug_mode), by call site: the loop should have none besides
reading the tokens back. Prints tables last: the bins, the profiled window's kernels, and the
same window's kernels by the kind of step that launched them (kernels inside graph replays
are not attributed to a step).
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tokenmill import LLM, SamplingParams
from tokenmill.bench.presets import make_dummy_checkpoint
from tokenmill.bench.roofline import (
    ModelShape,
    measure_copy_bandwidth,
    measure_matmul_rate,
    step_floor,
)
from tokenmill.bench.workloads import mixed_workload, nano_workload


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


KINDS = (
    ("sampling", ("sampl", "threshold", "gumbel", "sort", "softmax", "topk", "cumsum")),
    ("attention", ("attn", "attention", "paged", "flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "matmul", "xmma", "cublas")),
    ("norm/rope/act", ("rms", "norm", "rotary", "rope", "silu", "act_and_mul")),
    ("copy/other", ("",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "copy/other"


def step_kind(s) -> str:
    """The bin of a scheduled step: decode-only by batch size, or mixed by token count."""
    ntok = sum(x.num_new_tokens for x in s.seqs)
    nseq = len(s.seqs)
    if all(x.num_new_tokens == 1 for x in s.seqs):
        return f"decode-only {'<64' if nseq < 64 else '64-255' if nseq < 256 else '>=256'} seqs"
    return "mixed <=2048" if ntok <= 2048 else "mixed >2048"


STEP_RANGE = "tm_step:"  # profiler range around each launch, named by the step's kind


def kernels_by_step_kind(events) -> dict[str, tuple[int, dict[str, list]]]:
    """{kind: (steps, {kernel: [device us, calls]})} from the STEP_RANGE ranges of a
    profile: every kernel launched inside a step's launch (forward and sampling), its device
    time summed per kernel name."""
    out: dict[str, tuple[int, dict]] = {}
    for e in events:
        if not e.name.startswith(STEP_RANGE):
            continue
        kind = e.name[len(STEP_RANGE) :]
        steps, per = out.get(kind, (0, defaultdict(lambda: [0.0, 0])))
        stack = [e]
        while stack:
            ev = stack.pop()
            for k in ev.kernels:
                per[k.name][0] += k.duration
                per[k.name][1] += 1
            stack.extend(ev.cpu_children)
        out[kind] = (steps + 1, per)
    return out


def run(llm: LLM, wl, top_p: float, floor_of, profile_window=(300, 330)) -> dict:
    """Drive `wl` step by step; `floor_of(scheduled step)` gives a step's floor in seconds."""
    params = [
        SamplingParams(
            temperature=wl.temperature, top_p=top_p, ignore_eos=True, max_tokens=r.max_tokens
        )
        for r in wl.requests
    ]
    llm.generate([wl.requests[0].prompt], SamplingParams(max_tokens=8, top_p=top_p))  # warm
    runner, sched = llm.runner, llm.scheduler
    host = defaultdict(float)
    last = {}

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            host[key] += time.perf_counter() - t0
            if key == "schedule":
                last["sched"] = out
            return out

        setattr(obj, name, wrapper)
        return fn

    orig = [
        (sched, "schedule", timed(sched, "schedule", "schedule")),
        (runner, "execute_async", timed(runner, "execute_async", "launch")),
        (llm, "_land", timed(llm, "_land", "land")),
    ]
    launch = runner.execute_async

    on_gpu = torch.cuda.is_available()

    def ranged_launch(sched_out, *a, **k):  # a named profiler range per step: its kernels
        # CUDA events around everything the launch queues: the step's device time
        pair = None
        if on_gpu:
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
        with record_function(STEP_RANGE + step_kind(sched_out)):
            out = launch(sched_out, *a, **k)
        if on_gpu:
            pair[1].record()
            last["events"] = pair
        return out

    runner.execute_async = ranged_launch
    for i, (r, p) in enumerate(zip(wl.requests, params)):
        llm.add_request(f"w{i}", r.prompt, p, stream=False)
    # count, wall, tokens, host launch s, host land s, floor s, device s
    bins: dict[str, list] = defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0, 0.0, 0.0])
    step_bins = []  # per step: its bin, to add the device time once the run is done
    prof_res = None
    sync()
    t_start = time.perf_counter()
    step = 0
    prof = None
    while llm.has_unfinished_requests():
        if step == profile_window[0]:
            sync()
            prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            prof.__enter__()
            t_prof = time.perf_counter()
        g0, e0 = runner.num_graph_steps, runner.num_eager_steps
        h0 = dict(host)
        t0 = time.perf_counter()
        llm.step()
        wall = time.perf_counter() - t0
        s = last.get("sched")
        ntok = sum(x.num_new_tokens for x in s.seqs) if s is not None else 0
        how = (
            "graph"
            if runner.num_graph_steps > g0
            else "eager"
            if runner.num_eager_steps > e0
            else "-"
        )
        size = step_kind(s) if s is not None and s.seqs else "decode-only <64 seqs"
        b = bins[f"{size} ({how})"]
        b[0], b[1], b[2] = b[0] + 1, b[1] + wall, b[2] + ntok
        b[3] += host.get("launch", 0.0) - h0.get("launch", 0.0)
        b[4] += host.get("land", 0.0) - h0.get("land", 0.0)
        b[5] += floor_of(s) if s is not None and s.seqs else 0.0
        step_bins.append((b, last.pop("events", None)))
        step += 1
        if prof is not None and step == profile_window[1]:
            sync()
            prof_wall = (time.perf_counter() - t_prof) / (profile_window[1] - profile_window[0])
            prof.__exit__(None, None, None)
            prof_res = (
                prof.key_averages(),
                prof_wall,
                profile_window[1] - profile_window[0],
                kernels_by_step_kind(prof.events()),
            )
            prof = None
    sync()
    total = time.perf_counter() - t_start
    for b, pair in step_bins:  # device time from the step's first to its last queued work
        if pair is not None:
            b[6] += pair[0].elapsed_time(pair[1]) / 1e3
    runner.execute_async = launch
    for obj, name, fn in orig:
        setattr(obj, name, fn)
    return {"total": total, "steps": step, "bins": dict(bins), "host": dict(host), "prof": prof_res}


def report(name: str, wl, res: dict) -> None:
    out_tokens = wl.num_output_tokens
    print(
        f"\n## {name}: {res['total']:.2f} s, {out_tokens / res['total']:,.0f} out tok/s, "
        f"{res['steps']} steps"
    )
    print(
        "| steps | count | wall s | ms/step | tokens/step | host launch ms/step | "
        "land (read back + outputs) ms/step | device ms/step | floor ms/step | "
        "fraction of floor |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = sorted(res["bins"].items(), key=lambda kv: -kv[1][1])
    for k, (n, wall, tok, launch, land, floor, dev) in rows:
        print(
            f"| {k} | {n} | {wall:.2f} | {1e3 * wall / n:.2f} | {tok / n:.0f} | "
            f"{1e3 * launch / n:.2f} | {1e3 * land / n:.2f} | {1e3 * dev / n:.2f} | "
            f"{1e3 * floor / n:.2f} | {floor / wall:.2f} |"
        )
    floor = sum(b[5] for b in res["bins"].values())
    print(
        f"sum of step floors {floor:.2f} s, fraction {floor / res['total']:.2f} "
        "(above the workload's floor: real steps re-read the weights more often)"
    )
    h = res["host"]
    print(
        "host s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in h.items())
        + f" (sum {sum(h.values()):.2f} of {res['total']:.2f})"
    )
    if res["prof"] is None:
        return
    ka, wall, n, by_step_kind = res["prof"]
    gpu = [e for e in ka if e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in gpu) / n / 1e3
    by_kind = defaultdict(float)
    for e in gpu:
        by_kind[kind_of(e.key)] += e.self_device_time_total / n / 1e3
    print(f"profile window ({n} steps): wall {wall * 1e3:.2f} ms/step, GPU busy {busy:.2f} ms/step")
    print(
        "by kind ms/step: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    )
    print("| kernel | ms/step | calls/step |\n|---|---|---|")
    for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"| {e.key[:60]} | {e.self_device_time_total / n / 1e3:.3f} | {e.count / n:.1f} |")
    for kind, (steps, per) in sorted(by_step_kind.items()):
        total = sum(us for us, _ in per.values()) / steps / 1e3
        print(
            f"\n{kind}: {steps} steps in the window, {total:.2f} ms of kernels a step "
            "(launched by the step: forward and sampling)"
        )
        print("| kernel | ms/step | calls/step |\n|---|---|---|")
        for name, (us, calls) in sorted(per.items(), key=lambda kv: -kv[1][0])[:10]:
            print(f"| {name[:60]} | {us / steps / 1e3:.3f} | {calls / steps:.1f} |")


def count_syncs() -> Counter:
    """Synchronising torch calls from now on, by their innermost three tokenmill frames."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "tokenmill" in f.filename]
        sites[
            " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:3])
        ] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    return sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen3-0.6b")
    ap.add_argument("--workload", choices=("mixed", "nano"), default="mixed")
    ap.add_argument("--top-p", type=float, default=None, help="default: 0.95 (mixed), 1 (nano)")
    ap.add_argument("--also-plain", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--profile-steps", default="300,330")
    ap.add_argument("--sync-debug", action="store_true")
    args = ap.parse_args()
    window = tuple(int(x) for x in args.profile_steps.split(","))
    d = make_dummy_checkpoint(args.arch, weights=False)
    # no prefix caching: the second run must not find the first run's prompts cached
    llm = LLM(
        str(d),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
    )
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"card {card}; max_num_seqs {llm.config.max_num_seqs}, "
        f"max_num_batched_tokens {llm.config.max_num_batched_tokens}"
    )
    vocab = min(10_000, llm.hf_config.vocab_size)
    if args.workload == "mixed":
        wl, name, top_p = mixed_workload(args.num_prompts, vocab, seed=0), "W2", 0.95
    else:
        wl, name, top_p = nano_workload(), "W1", 1.0
    top_p = top_p if args.top_p is None else args.top_p
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = ModelShape.from_hf_config(llm.hf_config)
    bandwidth = measure_copy_bandwidth(device)
    flops_per_s = measure_matmul_rate(device, torch.bfloat16)
    print(f"copy {bandwidth / 1e12:.2f} TB/s, matmul {flops_per_s / 1e12:.0f} TFLOP/s")

    def floor_of(s):
        rows = [(x.start_pos, x.num_new_tokens, x.sample) for x in s.seqs]
        return step_floor(shape, rows, bandwidth, flops_per_s)

    syncs = count_syncs() if args.sync_debug else None
    report(f"{name} top-p {top_p}", wl, run(llm, wl, top_p, floor_of, window))
    if syncs is not None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        print("\n| synchronising call site | count |\n|---|---|")
        for site, n in syncs.most_common(15):
            print(f"| {site} | {n} |")
    if args.also_plain:
        report(f"{name} plain temperature", wl, run(llm, wl, 1.0, floor_of, window))


if __name__ == "__main__":
    main()
