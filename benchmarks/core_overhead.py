"""Where the engine core's time goes under `serve`, against `generate`: same LLM, same process.

    python3 benchmarks/core_overhead.py [MODEL | --dummy-arch smollm2-135m] [--workload nano]
                                        [--profile]

One LLM runs the workload three ways, after a warm-up pass of each:
  offline   llm.generate (what `bench throughput` times)
  core      engine/core_proc.run_core with every request added in one CoreRequest as the server
            adds them (token-only streams), outputs dropped: the core loop's own cost
  pipe      run_core_over_pipe, as `serve`'s engine process runs: PipeSender over a real pipe,
            read and unpickled by another process
Prints wall seconds, steps and ms per step for each (and, with --profile, the 25 functions with
the most own time in each, under $OUT or ./out/core_overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.workloads import build_workload  # noqa: E402
from tokenmill.engine.core_messages import CoreRequest, EngineRequest  # noqa: E402
from tokenmill.engine.core_proc import run_core, run_core_over_pipe  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():  # a busy process: what the API server and the client are to us
        sum(range(10_000))


def _drain(conn, ready) -> None:
    ready.send(True)  # imported and reading: the clock may start
    try:
        while True:
            conn.recv()
    except EOFError:
        pass


def _requests(workload, tag: str) -> list[EngineRequest]:
    return [
        EngineRequest(
            f"{tag}-{i}",
            r.prompt,
            SamplingParams(
                temperature=workload.temperature, ignore_eos=True, max_tokens=r.max_tokens
            ),
            stream=True,
            detokenize=False,
        )
        for i, r in enumerate(workload.requests)
    ]


def _receive_all_then_stop(llm, adds):
    pending = [[CoreRequest(adds=adds)]]

    def receive(block: bool):
        if pending:
            return pending.pop()
        if block and not llm.has_unfinished_requests():
            return [CoreRequest(shutdown=True)]
        return []

    return receive


def run_offline(llm, workload, tag):
    params = [
        SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=r.max_tokens)
        for r in workload.requests
    ]
    t0 = time.perf_counter()
    llm.generate([r.prompt for r in workload.requests], params, use_tqdm=False)
    return time.perf_counter() - t0


def run_core_loop(llm, workload, tag):
    receive = _receive_all_then_stop(llm, _requests(workload, tag))
    t0 = time.perf_counter()
    run_core(llm, receive, lambda msg: None)
    return time.perf_counter() - t0


def run_pipe(llm, workload, tag):
    ctx = mp.get_context("spawn")
    theirs, ours = ctx.Pipe(duplex=False)
    ready_r, ready_w = ctx.Pipe(duplex=False)
    reader = ctx.Process(target=_drain, args=(theirs, ready_w), daemon=True)
    reader.start()  # spawned and importing before the clock starts
    theirs.close()
    ready_r.recv()

    class Requests:  # the request side of the pipe: all adds at once, then shutdown when idle
        def __init__(self, adds):
            self.inbox = [CoreRequest(adds=adds)]
            self.received = self.applied = self.done = False
            self.r, self.w = os.pipe()  # select() needs a descriptor; written when idle

        def fileno(self):
            return self.r

        def poll(self, timeout):
            if self.inbox:
                return True
            # NOTE: the engine applies the adds only after this receive returns. Sending the
            # shutdown in the same receive (the engine has no requests yet) ended each pass at
            # once, so its requests ran on inside the next, timed pass, which then stepped
            # twice the sequences (every "pipe" figure before 2026-11-30 had this).
            if self.applied and not self.done and not llm.has_unfinished_requests():
                self.inbox.append(CoreRequest(shutdown=True))  # the run is over
                self.done = True
                return True
            self.applied = self.received  # this receive ends here: the engine applies them
            return False

        def recv(self):
            self.received = True
            return self.inbox.pop(0)

    requests = Requests(_requests(workload, tag))
    os.write(requests.w, b"x")  # always readable: the idle loop reads the shutdown at once
    t0 = time.perf_counter()
    run_core_over_pipe(llm, requests, ours)
    wall = time.perf_counter() - t0
    ours.close()
    reader.join(10)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--workload", default="nano")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--input-len", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dummy-arch", help="a bench preset (e.g. smollm2-135m), random weights")
    ap.add_argument("--busy", type=int, default=0, help="this many busy processes meanwhile")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for this process")
    ap.add_argument("--only", help="comma-separated paths to run (offline,core,pipe)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out/core_overhead"))
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stop = mp.get_context("spawn").Event()
    for _ in range(args.busy):
        mp.get_context("spawn").Process(target=_spin, args=(stop,), daemon=True).start()
    if args.dummy_arch:
        from tokenmill.bench.presets import make_dummy_checkpoint

        path = make_dummy_checkpoint(args.dummy_arch, device=args.device, weights=False)
        llm = LLM(
            str(path),
            device=args.device,
            load_format="dummy",
            skip_tokenizer_init=True,
            enable_prefix_caching=False,
        )
    else:  # NOTE: no prefix caching: every pass runs the same prompts, all must prefill
        kw = dict(device=args.device, enable_prefix_caching=False)
        llm = LLM(args.model, **kw) if args.model else LLM(**kw)
    workload = build_workload(
        args.workload, None, args.num_prompts, args.input_len, args.output_len
    )
    rows = []
    faults = {}  # name -> (minor page faults, system CPU seconds) during the timed pass
    order = [("offline", run_offline), ("core", run_core_loop), ("pipe", run_pipe)]
    if os.environ.get("REVERSE"):
        order.reverse()
    if args.only:
        order = [(n, f) for n, f in order if n in args.only.split(",")]
    for name, fn in order:
        fn(llm, workload, f"warm-{name}")
        steps0 = llm.stats.num_steps
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        wall = fn(llm, workload, name)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        faults[name] = (ru1.ru_minflt - ru0.ru_minflt, ru1.ru_stime - ru0.ru_stime)
        if prof:
            prof.disable()
        steps = llm.stats.num_steps - steps0
        rows.append((name, wall, steps))
        if prof:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            (out / f"profile_{name}.txt").write_text(text.getvalue())
    stop.set()
    print(f"busy processes {args.busy}, torch threads {__import__('torch').get_num_threads()}")
    print(f"{'path':8s} {'wall s':>8s} {'steps':>6s} {'ms/step':>8s}  (profiled: {args.profile})")
    for name, wall, steps in rows:
        flt, sys_s = faults[name]
        print(
            f"{name:8s} {wall:8.2f} {steps:6d} {1e3 * wall / max(steps, 1):8.2f}"
            f"  ({flt} minor page faults, {sys_s:.2f} s system CPU)"
        )


if __name__ == "__main__":
    main()
