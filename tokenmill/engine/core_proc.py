"""The engine core: scheduler + model runner behind a message loop, on a thread or in its own
process. A front end (the server) talks to it only through plain dataclasses:

    front end (ThreadCore / ProcCore)               core (run_core, owns the LLM)
    ---------------------------------               -----------------------------
    send(CoreRequest(adds, aborts)) ---queue/pipe-->  apply adds / aborts between steps
    on_output(CoreOutput)  <--one message per step--  llm.step() -> OutputDeltas + stats

The messages are in core_messages.py; `OutputAssembler` (output_assembler.py) rebuilds the
cumulative RequestOutputs on the front end's side.

`ProcCore` runs the loop in a child process (multiprocessing spawn; pickled dataclasses over a
pipe), so the front end's HTTP, JSON and SSE work no longer shares a GIL with the thread that
drives the GPU. `ThreadCore` runs the same loop on a thread of the caller's process. Either
calls `on_dead(message)` once when the core stops (`stopping` tells an expected stop from a
crash or a kill -9). Set `on_output` / `on_dead` before `start()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import queue
import resource
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core_messages import (
    CompletionDelta,
    CoreInfo,
    CoreOutput,
    CoreRequest,
    OutputDelta,
)
from tokenmill.engine.input_processor import ModelLimits
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.stats import EngineStats

logger = logging.getLogger(__name__)


# ---- the loop (core side) ------------------------------------------------------------------------
class EngineCore:
    """Applies CoreRequests to an LLM and turns its steps into CoreOutputs."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._sent: dict[str, list[tuple[int, int]]] = {}  # request id -> (chars, tokens) sent
        # Token-only streams: request id -> its engine Requests, read after each step.
        self._token_only: dict[str, list[Any]] = {}
        self._prompt_logprobs_sent: set[str] = set()  # sent once, when the prompt is scored

    def apply(self, msg: CoreRequest) -> dict[str, str]:
        rejected = {}
        for rid in msg.aborts:
            self._sent.pop(rid, None)
            self._token_only.pop(rid, None)
            self._prompt_logprobs_sent.discard(rid)
            self.llm.abort_request(rid)
        for add in msg.adds:
            token_only = add.stream and not add.detokenize
            try:
                self.llm.add_request(
                    add.request_id,
                    add.prompt_token_ids,
                    add.params,
                    stream=add.stream and not token_only,
                )
            except ValueError as e:  # the input processor should have caught it; say why
                rejected[add.request_id] = str(e)
                continue
            self._sent[add.request_id] = [(0, 0)] * add.params.n
            if token_only:
                # NOTE: reads the LLM's request records (no public API gives a stream=False
                # request's tokens before it ends); the Requests' token lists only grow.
                state = self.llm.output_processor.states[add.request_id]
                self._token_only[add.request_id] = state.children
                state.decode_text = False  # the front end decodes; text is never sent
        return rejected

    def step(self) -> tuple[list[OutputDelta], dict[str, list[int]]]:
        """One engine step: (deltas, new token ids of unfinished one-completion token-only
        requests). The second goes as a plain dict: the hot path of a streaming server is one
        new token per request per step, and a dict of int lists pickles ~20x faster than the
        same tokens wrapped in OutputDelta dataclasses (0.02 vs 0.4 ms at 256 requests)."""
        if not self.llm.has_unfinished_requests():
            return [], {}
        deltas = [self._delta(out) for out in self.llm.step() if out.request_id in self._sent]
        for rid in [d.request_id for d in deltas if d.finished]:
            self._token_only.pop(rid, None)
        tokens: dict[str, list[int]] = {}
        for rid, children in self._token_only.items():
            sent = self._sent[rid]
            if len(children) == 1:
                req, num_sent = children[0], sent[0][1]
                if req.num_output_tokens > num_sent:
                    tokens[rid] = req.output_token_ids[num_sent:]  # a slice: a new list
                    sent[0] = (0, req.num_output_tokens)
                continue
            delta = self._token_delta(rid, children, sent)
            if delta is not None:
                deltas.append(delta)
        return deltas, tokens

    @staticmethod
    def _token_delta(rid: str, children: list[Any], sent: list) -> OutputDelta | None:
        """New token ids of an unfinished token-only request with n > 1 (None if it did not
        move)."""
        completions = []
        for i, req in enumerate(children):
            num_sent = sent[i][1]
            if req.num_output_tokens > num_sent:
                new = req.output_token_ids[num_sent:]
                completions.append(CompletionDelta(i, "", list(new), None))
                sent[i] = (0, num_sent + len(new))
        return OutputDelta(rid, completions, False) if completions else None

    def _delta(self, out: RequestOutput) -> OutputDelta:
        sent = self._sent[out.request_id]
        token_only = out.request_id in self._token_only
        completions = []
        for c in out.outputs:
            chars, tokens = sent[c.index]
            completions.append(
                CompletionDelta(
                    index=c.index,
                    text="" if token_only else c.text[chars:],
                    token_ids=c.token_ids[tokens:],
                    logprobs=None if c.logprobs is None else c.logprobs[tokens:],
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
            sent[c.index] = (max(chars, len(c.text)), len(c.token_ids))
        prompt_logprobs = None
        if out.prompt_logprobs is not None and out.request_id not in self._prompt_logprobs_sent:
            prompt_logprobs = out.prompt_logprobs
            self._prompt_logprobs_sent.add(out.request_id)
        queue_time = None
        if out.finished:
            del self._sent[out.request_id]
            self._prompt_logprobs_sent.discard(out.request_id)
            m = out.metrics
            if m is not None and m.first_scheduled_time is not None:
                queue_time = m.first_scheduled_time - m.arrival_time
        return OutputDelta(
            out.request_id,
            completions,
            out.finished,
            out.num_cached_tokens,
            queue_time,
            prompt_logprobs,
        )

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.llm.stats)  # a snapshot: the engine's object mutates


def run_core(
    llm: Any,
    receive: Callable[[bool], list[CoreRequest]],
    send: Callable[[CoreOutput], None],
) -> None:
    """The core loop: apply what arrived, step, send one CoreOutput. `receive(block)` returns
    the messages waiting (blocking for one when the engine is idle); returns on shutdown."""
    core = EngineCore(llm)
    trace = _StepTrace.from_env()
    while True:
        rejected: dict[str, str] = {}
        moved = False
        msgs = receive(not llm.has_unfinished_requests())
        t0 = time.perf_counter()
        for msg in msgs:
            if msg.shutdown:
                return
            rejected.update(core.apply(msg))
            moved = moved or bool(msg.aborts)
        t1 = time.perf_counter()
        stepped = llm.has_unfinished_requests()
        outputs, tokens = core.step()
        t2 = time.perf_counter()
        if outputs or tokens or rejected or moved or llm.has_unfinished_requests():
            send(CoreOutput(outputs, rejected, core.stats(), tokens))
        if trace is not None and (stepped or msgs):
            trace.write(msgs, t0, t1, t2, llm.stats, len(tokens) + len(outputs))


class _StepTrace:
    """TOKENMILL_CORE_TRACE=PATH: one JSON line per loop of the engine core (a diagnostic for
    `serve`): when it ran (seconds since the first line), requests added, time applying the
    messages and stepping, running / waiting requests after the step and requests that moved."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - line-buffered
        self._start: float | None = None

    @classmethod
    def from_env(cls) -> _StepTrace | None:
        path = os.environ.get("TOKENMILL_CORE_TRACE")
        return cls(path) if path else None

    def write(self, msgs, t0: float, t1: float, t2: float, stats: EngineStats, moved: int) -> None:
        import json

        if self._start is None:
            self._start = t0
        adds = sum(len(m.adds) for m in msgs)
        line = {
            "t": round(t0 - self._start, 6),
            "adds": adds,
            "apply_ms": round(1e3 * (t1 - t0), 3),
            "step_ms": round(1e3 * (t2 - t1), 3),
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "moved": moved,
            "steps": stats.num_steps,
            # page faults and system CPU so far (a host-side slowdown would show here)
            "minflt": (ru := resource.getrusage(resource.RUSAGE_SELF)).ru_minflt,
            "sys_s": round(ru.ru_stime, 3),
        }
        self._file.write(json.dumps(line) + "\n")


def core_info(llm: Any) -> CoreInfo:
    info = llm.model_info()
    return CoreInfo(
        limits=ModelLimits.of(llm),
        model_info=info,
        model_dir=str(info["model_dir"]),
        model_name=str(info["model"]),
        stats=EngineCore(llm).stats(),
        config=getattr(llm, "config", None),
    )


class _Core:
    """What ThreadCore and ProcCore share: an inbox, the callbacks, the dead flag."""

    def __init__(self) -> None:
        self._inbox: queue.Queue[CoreRequest] = queue.Queue()
        self._dead = threading.Event()
        self.stopping = False  # shutdown() was called: a stop is expected
        self.info = CoreInfo()
        self.on_output: Callable[[CoreOutput], None] = lambda msg: None
        self.on_dead: Callable[[str], None] = lambda message: None

    @property
    def is_alive(self) -> bool:
        return not self._dead.is_set()

    def send(self, msg: CoreRequest) -> None:
        """Queue a message for the core (never blocks the caller)."""
        self._inbox.put(msg)

    def _die(self, message: str) -> None:
        if not self._dead.is_set():
            self._dead.set()
            if not self.stopping:
                logger.error("the engine core stopped: %s", message)
            self.on_dead(message)


def _drain(inbox: queue.Queue, block: bool, timeout: float | None = None) -> list[CoreRequest]:
    msgs = []
    try:
        if block:
            msgs.append(inbox.get(timeout=timeout))
        while True:
            msgs.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return msgs


class ThreadCore(_Core):
    """The core loop on a thread of this process, over an already-built LLM."""

    def __init__(self, llm: Any) -> None:
        super().__init__()
        self.llm = llm
        self.info = core_info(llm)
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            run_core(self.llm, lambda block: _drain(self._inbox, block), self.on_output)
        except BaseException as e:  # a crash must reach every waiting request, not hang them
            logger.exception("engine thread crashed")
            self._die(f"the engine crashed: {e!r}")
        else:
            self.stopping = True
            self._die("the server is shutting down")

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.send(CoreRequest(shutdown=True))
        if self._thread.is_alive():
            self._thread.join(timeout)


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """End this process (a daemon thread watches) once `parent_pid` is no longer its parent:
    a kill -9 of the front end while the model loads, when no pipe read would notice."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="tokenmill-parent-watch", daemon=True).start()


def _proc_main(
    config: EngineConfig,
    requests: Any,
    outputs: Any,
    num_threads: int | None = None,
    parent_pid: int | None = None,
) -> None:
    """The engine-core process: load the model, then loop until shutdown or a closed pipe.
    CoreRequests arrive on `requests`; CoreInfo, then CoreOutputs, leave on `outputs`.

    It ignores SIGINT / SIGTERM: a Ctrl-C (sent to the whole process group) or a service
    manager's SIGTERM is the front end's to handle; it stops this process through the pipe.
    It ends with its parent, however that dies. `num_threads` sets torch's CPU threads."""
    import signal

    from tokenmill.engine.gc_heap import freeze_startup_heap
    from tokenmill.engine.llm import LLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The front end sees this process as a daemon (ended with it), but multiprocessing refuses
    # any child to a daemonic process, and --tensor-parallel-size starts one worker per rank
    # from here. Its workers are daemonic children of this process.
    mp.current_process().daemon = False
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)

    try:
        llm = LLM.from_config(config)
    except BaseException as e:
        outputs.send(CoreInfo(error=f"{type(e).__name__}: {e}"))
        return
    freeze_startup_heap()
    outputs.send(core_info(llm))
    run_core_over_pipe(llm, requests, outputs)


def run_core_over_pipe(llm: Any, requests: Any, outputs: Any) -> None:
    """The engine process's loop: CoreRequests in from the `requests` connection, CoreOutputs
    out through a PipeSender on the `outputs` one. Returns on shutdown or when the front end is
    gone."""
    sender = PipeSender(outputs)

    def receive(block: bool) -> list[CoreRequest]:
        if block:  # idle: wait for a request, writing queued outputs as the pipe drains
            while True:
                waiting_out = [sender] if sender.has_pending else []
                readable, writable, _ = select.select([requests], waiting_out, [])
                if writable:
                    sender.flush()
                if readable:
                    break
        elif sender.has_pending:
            sender.flush()
        msgs = []
        while requests.poll(0):
            msgs.append(requests.recv())  # EOFError: the front end is gone; the process ends
        return msgs

    try:
        run_core(llm, receive, sender.send)
    except (EOFError, BrokenPipeError):
        pass  # the front end is gone: nobody is left to serve
    finally:
        sender.close()


class PipeSender:
    """Writes the engine loop's CoreOutputs into a non-blocking pipe, with no thread: a step
    never waits for the front end to read, and no sender thread competes for the GIL with a
    loop that releases it in every torch call.

    History: a blocking `conn.send` stalled the engine loop for up to hundreds of ms when the
    front end read late (a step's outputs were more than the pipe held); a sender thread fixed
    that. Now `send` serializes and writes what the pipe takes at once; the rest waits in a
    buffer, written by later sends or by the idle loop (select on `fileno()` while
    `has_pending`). Outputs queued behind a partly written message go out merged (their deltas
    in order, the latest stats), so a slow reader gets fewer, bigger messages. The bytes are
    framed as multiprocessing.Connection frames them: the front end reads with `conn.recv()`.

    NOTE: an earlier H200 figure (the loop at 3.7 ms a step with outputs dropped, 5.4 ms
    through a pipe, with 12x the page faults) was the benchmark's own harness: its "pipe"
    pass sent the shutdown before the engine had applied the adds, so each pass ended at
    once and its requests ran inside the next, timed, pass (twice the sequences). Fixed
    (`benchmarks/core_overhead.py --dummy-arch smollm2-135m`, nano, 1,032 steps, H200): offline
    3.37 / core 3.14 / pipe 3.02 ms a step, and 3.05 / 3.40 / 4.12 in the reverse order (the
    first path run is the slowest either way): the core loop and the pipe cost nothing
    measurable. Why `serve`'s engine stepped slower than offline is not explained by them.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # kept open while we write to its descriptor
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        _grow_pipe(self._fd)
        self._buf = bytearray()  # the framed message being written
        self._queued: list[CoreOutput] = []  # not serialized yet
        self._error: BaseException | None = None

    def fileno(self) -> int:
        return self._fd

    @property
    def has_pending(self) -> bool:
        return bool(self._buf or self._queued)

    def send(self, msg: CoreOutput) -> None:
        """Queue `msg` and write what the pipe takes; BrokenPipeError once the front end is
        gone."""
        self._queued.append(msg)
        self.flush()

    def flush(self) -> None:
        """Write queued outputs until the pipe is full or nothing is left (never blocks)."""
        if self._error is not None:
            raise BrokenPipeError(f"the front end is gone ({self._error!r})")
        while True:
            if not self._buf:
                if not self._queued:
                    return
                msg, self._queued = merge_outputs(self._queued), []
                self._buf = _frame(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            try:
                n = os.write(self._fd, self._buf)
            except BlockingIOError:
                return
            except OSError as e:  # EPIPE: the reader closed its end
                self._error = e
                raise BrokenPipeError(f"the front end is gone ({e!r})") from None
            del self._buf[:n]

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting up to `timeout` for the reader), then stop."""
        deadline = time.monotonic() + timeout
        try:
            while self.has_pending and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                select.select([], [self._fd], [], left)
                self.flush()
        except BrokenPipeError:
            pass


def _frame(payload: bytes) -> bytearray:
    """multiprocessing.Connection's framing of one message (what its recv() reads)."""
    n = len(payload)
    header = (
        struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)
    )
    return bytearray(header) + payload


def _grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Raise a pipe's capacity (Linux: 64 KiB by default; unprivileged processes may ask up to
    /proc/sys/fs/pipe-max-size, 1 MiB by default), so a slow reader rarely fills it. A no-op
    where it is not a pipe or not allowed."""
    import fcntl

    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


def merge_outputs(msgs: list[CoreOutput]) -> CoreOutput:
    """Consecutive CoreOutputs as one: every delta in order, every rejection, the last stats,
    each request's new token ids concatenated in order. The front end applies `tokens` before
    `outputs`, which keeps each request's order: a request's tokens travel in `tokens` only
    while it is unfinished, and its last delta (in `outputs`) is the last thing sent for it."""
    if len(msgs) == 1:
        return msgs[0]
    rejected: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    for m in msgs:
        rejected.update(m.rejected)
        for rid, ids in m.tokens.items():
            if rid in tokens:
                tokens[rid].extend(ids)
            else:
                tokens[rid] = list(ids)
    return CoreOutput([d for m in msgs for d in m.outputs], rejected, msgs[-1].stats, tokens)


_SPAWN_LOCK = threading.Lock()  # one child at a time sees os.environ changed by _environ


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """os.environ with `env` set, restored after: a spawned child inherits it from birth."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ProcCore(_Core):
    """The core loop in a child process that builds its own LLM from `config`.

    `env` is the child's environment on top of ours, there from its first instruction (so
    CUDA_VISIBLE_DEVICES pins a data-parallel replica to its GPU before anything can start
    CUDA); `num_threads` sets its torch CPU threads."""

    def __init__(
        self,
        config: EngineConfig,
        env: dict[str, str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")
        # Two one-way pipes: the core writes its outputs without blocking (PipeSender), which
        # needs a descriptor of its own; requests come on the other.
        core_requests, self._requests = ctx.Pipe(duplex=False)
        self._outputs, core_outputs = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_proc_main,
            args=(config, core_requests, core_outputs, num_threads, os.getpid()),
            name="tokenmill-engine-core",
            daemon=True,
        )
        with _SPAWN_LOCK, _environ(env or {}):
            self.process.start()
        # else our copies keep the pipes open and hide the child's death
        core_requests.close()
        core_outputs.close()
        try:
            self.info = self._outputs.recv()
        except EOFError:
            self.info = CoreInfo(error=f"the engine process exited ({self.process.exitcode})")
        if self.info.error is not None:
            self.process.join(10)
            raise RuntimeError(f"the engine process could not start: {self.info.error}")

    def start(self) -> None:
        threading.Thread(target=self._read, name="tokenmill-core-reader", daemon=True).start()
        threading.Thread(target=self._write, name="tokenmill-core-writer", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.on_output(self._outputs.recv())
        except (EOFError, OSError):
            pass
        except BaseException as e:  # a bug in on_output: nothing can be delivered any more
            logger.exception("engine core reader failed")
            self._die(f"the engine core reader failed: {e!r}")
            return
        self.process.join(1)
        self._die(f"the engine process exited (exit code {self.process.exitcode})")

    def _write(self) -> None:
        while True:
            msg = self._inbox.get()
            try:
                self._requests.send(msg)
            except (OSError, ValueError):
                return  # the reader notices the death
            if msg.shutdown:
                return

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        if self.process.is_alive():
            self.send(CoreRequest(shutdown=True))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
