"""The API process of `tokenmill serve` alone: its CPU cost per streamed token, on any machine.

    python benchmarks/api_overhead.py [--num-prompts 256] [--output-len 128] [--step-ms 0]
                                      [--profile out.prof]

The real server app (server/app.py over AsyncEngine) runs in this process, as under
`tokenmill serve`; its engine core is a child process that runs the real engine-process loop
(engine/core_proc.py's run_core_over_pipe) but has no model: every `--step-ms` it gives each
running request one token (random ids; ignore_eos), and it reports how long the loop spent
between steps (a send blocked on a full pipe shows up there). `tokenmill bench serve
--workload random` then sends all requests at once. The run shows what the front end costs:
the API process's CPU seconds per output token (tokenizing, pydantic, detokenizing, SSE,
HTTP), its tok/s and TTFT. With --step-ms 5 (about an H200's decode step) the API keeps up
only if its cost per token stays under 5 ms / num_prompts. `--profile PATH` writes a cProfile
of the event loop's thread.

`--pipeline` leaves HTTP out (and with it the client's CPU, which shares this machine): the
/v1/completions handler's steps (pydantic body, adapter, tokenizer thread, engine add, stream
formatting, SSE text) run in-process for every request, and the figure is this process's CPU
time per output token: steadier than the HTTP run on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.engine.core_messages import CoreInfo  # noqa: E402
from tokenmill.engine.core_proc import ProcCore, core_info, run_core_over_pipe  # noqa: E402
from tokenmill.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from tokenmill.engine.stats import EngineStats  # noqa: E402


@dataclass
class _Seq:
    max_tokens: int
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


class InstantLLM:
    """What run_core drives, without a model: one token per running request per step."""

    def __init__(self, model_dir: str, step_s: float, max_model_len: int = 8192) -> None:
        self.step_s, self.max_model_len, self.model_dir = step_s, max_model_len, model_dir
        self.states: dict[str, SimpleNamespace] = {}
        self.output_processor = SimpleNamespace(states=self.states)  # what EngineCore reads
        self._stats = EngineStats()
        self._token = 0
        self._last_step_end: float | None = None
        # Time between one step's end and the next one's start while requests were running
        # (the loop's own work plus any stall), its longest gap, and the steps.
        self.stalls = {"gap_s": 0.0, "max_gap_s": 0.0, "steps": 0}

    def model_info(self) -> dict:
        return {
            "model": "instant",
            "model_dir": self.model_dir,
            "max_model_len": self.max_model_len,
            "vocab_size": 49152,
            "num_kv_blocks": 1 << 20,
            "block_size": 16,
        }

    @property
    def stats(self) -> EngineStats:
        self._stats.num_running = len(self.states)
        return self._stats

    def add_request(self, request_id, prompt, params=None, stream=True) -> None:
        children = [_Seq(params.max_tokens or 16) for _ in range(params.n)]
        self.states[request_id] = SimpleNamespace(children=children, prompt=list(prompt))

    def abort_request(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if self._last_step_end is not None:
            gap = start - self._last_step_end
            self.stalls["gap_s"] += gap
            self.stalls["max_gap_s"] = max(self.stalls["max_gap_s"], gap)
            self.stalls["steps"] += 1
        if self.step_s:
            time.sleep(self.step_s)
        self._stats.num_steps += 1
        finished = []
        for rid, state in self.states.items():
            for seq in state.children:
                self._token = (self._token + 7919) % 40000 + 100  # ordinary BPE ids
                seq.output_token_ids.append(self._token)
                self._stats.num_generated_tokens += 1
            if all(s.num_output_tokens >= s.max_tokens for s in state.children):
                finished.append(rid)
        outs = []
        for rid in finished:
            state = self.states.pop(rid)
            completions = [
                CompletionOutput(i, "", list(s.output_token_ids), "length")
                for i, s in enumerate(state.children)
            ]
            outs.append(RequestOutput(rid, None, state.prompt, completions, finished=True))
        self._last_step_end = time.perf_counter() if self.states else None
        return outs


STALL_LOG = Path(tempfile.gettempdir()) / f"api_overhead_stalls.{os.getpid()}.json"


def _instant_main(model_dir: str, step_s: float, requests, outputs, stall_log: str) -> None:
    """The child process: ProcCore's _proc_main with InstantLLM instead of LLM (the same loop,
    run_core_over_pipe). InstantLLM records the loop's stalls: time between steps beyond the
    bookkeeping, e.g. a send blocked on a full pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    llm = InstantLLM(model_dir, step_s)
    outputs.send(core_info(llm))
    run_core_over_pipe(llm, requests, outputs)
    Path(stall_log).write_text(json.dumps(llm.stalls))


class InstantProcCore(ProcCore):
    def __init__(self, model_dir: str, step_s: float) -> None:  # noqa: D107 - ProcCore's, inlined
        import multiprocessing as mp

        super(ProcCore, self).__init__()
        ctx = mp.get_context("spawn")
        core_requests, self._requests = ctx.Pipe(duplex=False)
        self._outputs, core_outputs = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_instant_main,
            args=(model_dir, step_s, core_requests, core_outputs, str(STALL_LOG)),
            daemon=True,
        )
        self.process.start()
        core_requests.close()
        core_outputs.close()
        self.info: CoreInfo = self._outputs.recv()


def _pipeline_bodies(num_prompts: int, input_len: int, output_len: int) -> list[tuple[dict, int]]:
    """The request bodies (and their JSON sizes), made before the clock starts: drawing 600
    random ids per prompt cost more CPU than the handler under test."""
    import random

    rng = random.Random(0)
    bodies = []
    for _ in range(num_prompts):
        raw = {
            "model": "instant",
            "prompt": [rng.randrange(100, 40000) for _ in range(input_len)],
            "max_tokens": output_len,
            "temperature": 0.6,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        bodies.append((raw, len(json.dumps(raw))))
    return bodies


async def _pipeline(engine, bodies: list[tuple[dict, int]]) -> tuple[int, float, float]:
    """What server/app.py's completions handler does per request, minus HTTP; returns the
    number of SSE events produced, and the CPU and wall seconds it took (the engine's start,
    which copies the tokenizer for the loop and a thread, is outside the clock: a server does
    it before its first request)."""
    import asyncio

    from tokenmill.engine.core_messages import EngineRequest
    from tokenmill.server.completions import CompletionStream, prepare_prompts, split_prompts
    from tokenmill.server.protocol import CompletionRequest
    from tokenmill.server.serving import sse_stream

    engine.start()
    await asyncio.sleep(0.5)  # the tokenizer thread's own copy, made in the background

    async def one(i: int) -> int:
        raw, size = bodies[i]  # size: the body's bytes (small ones are prepared inline)
        body = CompletionRequest.model_validate(raw)
        params = body.to_sampling_params()
        prompts = split_prompts(body.prompt)
        prepared = await engine.prepare(
            lambda proc: prepare_prompts(proc, prompts, params, False), size
        )
        queue: asyncio.Queue = asyncio.Queue()
        request = EngineRequest(f"r{i}", prepared[0].token_ids, params, True, False)
        engine.add([request], queue)
        fmt = CompletionStream(body, params, "instant", prepared, [request.request_id])
        events = fmt.sse_events(engine.stream([request.request_id], queue), lambda t, o: None)
        num = 0
        async for _ in sse_stream(events):
            num += 1
        return num

    cpu0, t0 = time.process_time(), time.perf_counter()
    num = sum(await asyncio.gather(*(one(i) for i in range(len(bodies)))))
    return num, time.process_time() - cpu0, time.perf_counter() - t0


def run_pipeline(args, model_dir: str) -> None:
    import asyncio

    from tokenmill.server.async_engine import AsyncEngine

    engine = AsyncEngine(InstantProcCore(model_dir, args.step_ms / 1000))
    bodies = _pipeline_bodies(args.num_prompts, args.input_len, args.output_len)
    num_events, cpu, wall = asyncio.run(_pipeline(engine, bodies))
    engine.shutdown(5)
    tokens = args.num_prompts * args.output_len
    print(
        f"api_pipeline: {tokens} tokens in {num_events} events, wall {wall:.2f} s, "
        f"cpu {cpu:.2f} s = {1e6 * cpu / tokens:.1f} us per token, "
        f"{tokens / wall:,.0f} tok/s, engine steps {engine.stats.num_steps}, {_blocked()}"
    )


def _blocked() -> str:
    for _ in range(50):  # the child writes it as it exits
        if STALL_LOG.exists():
            b = json.loads(STALL_LOG.read_text())
            STALL_LOG.unlink()
            return (
                f"engine loop between steps {b['gap_s']:.2f} s over {b['steps']} steps "
                f"(longest {1e3 * b['max_gap_s']:.0f} ms)"
            )
        time.sleep(0.1)
    return "engine stalls unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--model", help="checkpoint directory whose tokenizer the API uses")
    ap.add_argument("--profile", help="write a cProfile of the event loop here")
    ap.add_argument("--output-json", help="write the figures here")
    ap.add_argument("--switch-interval-ms", type=float, help="sys.setswitchinterval (GIL)")
    ap.add_argument("--pipeline", action="store_true", help="no HTTP: see the docstring")
    args = ap.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)

    import uvicorn

    from tokenmill.engine.model_source import resolve_model
    from tokenmill.server.app import build_app
    from tokenmill.server.async_engine import AsyncEngine

    model_dir = args.model or str(resolve_model(None, None, None)[0])
    if args.pipeline:
        return run_pipeline(args, model_dir)
    engine = AsyncEngine(InstantProcCore(model_dir, args.step_ms / 1000))
    app = build_app(engine, served_model_name="instant")
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    out = Path(args.output_json or tempfile.mkstemp(suffix=".json")[1])
    figures: dict = {}

    def drive() -> None:
        while not server.started:
            time.sleep(0.05)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cmd = [
            sys.executable,
            *("-m", "tokenmill", "bench", "serve", "--url", f"http://127.0.0.1:{args.port}"),
            *("--workload", "random", "--num-prompts", str(args.num_prompts)),
            *("--input-len", str(args.input_len), "--output-len", str(args.output_len)),
            *("--output-json", str(out)),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        wall = time.perf_counter() - t0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        figures.update(wall_s=wall, api_cpu_s=cpu, returncode=proc.returncode)
        if proc.returncode != 0:
            figures["stderr"] = proc.stderr[-2000:]
        server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    if args.profile:
        import cProfile

        with cProfile.Profile() as prof:
            server.run()
        prof.dump_stats(args.profile)
    else:
        server.run()
    engine.shutdown(5)
    if figures.get("returncode"):
        sys.exit(f"bench serve failed: {figures.get('stderr')}")
    bench = json.loads(out.read_text())
    tokens = args.num_prompts * args.output_len
    row = {
        "output_tok_s": bench.get("output_token_throughput"),
        "api_cpu_us_per_token": 1e6 * figures["api_cpu_s"] / tokens,
        "api_cpu_s": figures["api_cpu_s"],
        "ttft_mean_ms": bench.get("mean_ttft_ms") or (bench.get("ttft_ms") or {}).get("mean"),
        "step_ms": args.step_ms,
        "engine_steps": engine.stats.num_steps,
        "duration_s": bench.get("duration_s"),
        "ideal_s": args.output_len * args.step_ms / 1000,
    }
    print(json.dumps(bench, indent=1)[:3000], file=sys.stderr)
    print("api_overhead: " + ", ".join(f"{k} {v}" for k, v in row.items()) + ", " + _blocked())


if __name__ == "__main__":
    main()
