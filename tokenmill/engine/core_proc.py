"""The engine core: scheduler + model runner behind a message loop, on a thread or in its own
process. A front end (the server) talks to it only through plain dataclasses:

    front end (EngineCoreClient)                    core (run_core, owns the LLM)
    ----------------------------                    -----------------------------
    send(CoreRequest(adds, aborts)) ---queue/pipe-->  apply adds / aborts between steps
    on_output(CoreOutput)  <--one message per step--  llm.step() -> OutputDeltas + stats

Outputs travel as deltas (new text, new token ids), not as the cumulative RequestOutputs the
LLM returns: a message then costs O(new tokens), not O(tokens so far). `OutputAssembler`
rebuilds the cumulative RequestOutputs on the front end's side.

`ProcCore` runs the loop in a child process (multiprocessing spawn; pickled dataclasses over a
pipe), so the front end's HTTP, JSON and SSE work no longer shares a GIL with the thread that
drives the GPU. `ThreadCore` runs the same loop on a thread of the caller's process. Either
calls `on_dead(message)` once when the core stops (`stopping` tells an expected stop from a
crash or a kill -9). Set `on_output` / `on_dead` before `start()`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.input_processor import ModelLimits
from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


# ---- messages ------------------------------------------------------------------------------------
@dataclass
class EngineRequest:
    """One request for the core: already tokenized and checked (see InputProcessor)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # False: the text is decoded once, at the end
    # With stream: True, the core detokenizes every step; False, it sends token ids only and
    # the front end detokenizes (OutputAssembler). Stop strings and logprobs need the core's.
    detokenize: bool = True

    @staticmethod
    def needs_core_text(params: SamplingParams) -> bool:
        """Whether the core must decode text as it goes: stop strings are matched there, and
        logprobs carry each token's text."""
        return bool(params.stop) or params.logprobs is not None


@dataclass
class CoreRequest:
    """Front end -> core. Adds of one message reach the scheduler before the same step."""

    adds: list[EngineRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    shutdown: bool = False


@dataclass
class CompletionDelta:
    index: int
    text: str  # new text since the last delta
    token_ids: list[int]  # new token ids
    logprobs: list[dict[int, Logprob]] | None  # one entry per new token, if asked for
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class OutputDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to the first step (when finished)


@dataclass
class CoreStats:
    """Engine state after a step, for /metrics and /health."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_scheduled_seqs_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass
class CoreOutput:
    """Core -> front end, once per step: every request that moved, and the adds it refused."""

    outputs: list[OutputDelta]
    rejected: dict[str, str]  # request id -> why add_request refused it
    stats: CoreStats


@dataclass
class CoreInfo:
    """Core -> front end, once, when the model is loaded (or failed to load: `error`)."""

    limits: ModelLimits | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    model_dir: str = ""
    model_name: str = ""
    stats: CoreStats = field(default_factory=CoreStats)  # before the first step
    error: str | None = None


# ---- the loop (core side) ------------------------------------------------------------------------
class EngineCore:
    """Applies CoreRequests to an LLM and turns its steps into CoreOutputs."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._sent: dict[str, list[tuple[int, int]]] = {}  # request id -> (chars, tokens) sent
        # Token-only streams: request id -> its engine Requests, read after each step.
        self._token_only: dict[str, list[Any]] = {}

    def apply(self, msg: CoreRequest) -> dict[str, str]:
        rejected = {}
        for rid in msg.aborts:
            self._sent.pop(rid, None)
            self._token_only.pop(rid, None)
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
        return rejected

    def step(self) -> list[OutputDelta]:
        if not self.llm.has_unfinished_requests():
            return []
        deltas = [self._delta(out) for out in self.llm.step() if out.request_id in self._sent]
        for rid in [d.request_id for d in deltas if d.finished]:
            self._token_only.pop(rid, None)
        for rid, children in self._token_only.items():
            delta = self._token_delta(rid, children)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _token_delta(self, rid: str, children: list[Any]) -> OutputDelta | None:
        """New token ids of an unfinished token-only request (None if it did not move)."""
        sent, completions = self._sent[rid], []
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
        queue_time = None
        if out.finished:
            del self._sent[out.request_id]
            m = out.metrics
            if m is not None and m.first_scheduled_time is not None:
                queue_time = m.first_scheduled_time - m.arrival_time
        return OutputDelta(
            out.request_id, completions, out.finished, out.num_cached_tokens, queue_time
        )

    def stats(self) -> CoreStats:
        llm, s = self.llm, self.llm.stats
        return CoreStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_kv_blocks=llm.num_kv_blocks,
            num_free_blocks=llm.num_free_blocks,
            num_prompt_tokens=s.num_prompt_tokens,
            num_generated_tokens=s.num_generated_tokens,
            num_preemptions=s.num_preemptions,
            num_steps=s.num_steps,
            num_scheduled_seqs_total=s.num_scheduled_seqs_total,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
        )


def run_core(
    llm: Any,
    receive: Callable[[bool], list[CoreRequest]],
    send: Callable[[CoreOutput], None],
) -> None:
    """The core loop: apply what arrived, step, send one CoreOutput. `receive(block)` returns
    the messages waiting (blocking for one when the engine is idle); returns on shutdown."""
    core = EngineCore(llm)
    while True:
        rejected: dict[str, str] = {}
        moved = False
        for msg in receive(not llm.has_unfinished_requests()):
            if msg.shutdown:
                return
            rejected.update(core.apply(msg))
            moved = moved or bool(msg.aborts)
        outputs = core.step()
        if outputs or rejected or moved or llm.has_unfinished_requests():
            send(CoreOutput(outputs, rejected, core.stats()))


def core_info(llm: Any) -> CoreInfo:
    return CoreInfo(
        limits=ModelLimits.of(llm),
        model_info=llm.model_info(),
        model_dir=str(llm.model_dir),
        model_name=str(llm.model_name),
        stats=EngineCore(llm).stats(),
    )


# ---- the front end's side ------------------------------------------------------------------------
class OutputAssembler:
    """Rebuilds cumulative RequestOutputs from OutputDeltas (front end side).

    `apply` updates one live RequestOutput per request in place and returns it: no copies, so
    a consumer that falls behind simply finds more new tokens when it next looks. For
    token-only requests (`EngineRequest.detokenize=False`) the text is decoded here, lazily:
    `refresh(out)` brings it up to date, once per look rather than once per step.
    NOTE: safe because deltas are applied on the thread that reads the outputs (the server's
    event loop); a consumer must not hold on to a field across an `await`.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        self._texts: dict[str, _TextState] = {}  # token-only requests, until their last refresh

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenize: bool = True,
    ) -> None:
        outs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(params.n)]
        self._outputs[request_id] = RequestOutput(request_id, None, prompt_token_ids, outs)
        if not detokenize:
            dets = [
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
                for _ in range(params.n)
            ]
            self._texts[request_id] = _TextState(dets, [0] * params.n)

    def discard(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)
        self._texts.pop(request_id, None)

    def apply(self, delta: OutputDelta) -> RequestOutput | None:
        out = self._outputs.get(delta.request_id)
        if out is None:  # aborted meanwhile
            return None
        for d in delta.completions:
            c = out.outputs[d.index]
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(d.logprobs)
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        out.finished, out.num_cached_tokens = delta.finished, delta.num_cached_tokens
        if delta.finished:
            del self._outputs[delta.request_id]
            out.extra["queue_time"] = delta.queue_time
        return out

    def refresh(self, out: RequestOutput) -> None:
        """Decode a token-only request's new tokens into its completions' text."""
        state = self._texts.get(out.request_id)
        if state is None:
            return
        for c in out.outputs:
            det, num_fed = state.dets[c.index], state.num_fed[c.index]
            end = len(c.token_ids)
            if c.finish_reason == "stop":  # by EOS or a stop token: its text is not shown
                end -= 1
            if end > num_fed:
                det.add(c.token_ids[num_fed:end])
                state.num_fed[c.index] = end
            if c.finished:
                det.flush()
            c.text = det.text
        if out.finished:
            del self._texts[out.request_id]


@dataclass
class _TextState:
    dets: list[IncrementalDetokenizer]
    num_fed: list[int]  # token ids given to each detokenizer


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


def _proc_main(config: EngineConfig, conn: Any) -> None:
    """The engine-core process: load the model, then loop until shutdown or a closed pipe.

    It ignores SIGINT / SIGTERM: a Ctrl-C (sent to the whole process group) or a service
    manager's SIGTERM is the front end's to handle; it stops this process through the pipe."""
    import signal

    from tokenmill.engine.llm import LLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        llm = LLM.from_config(config)
    except BaseException as e:
        conn.send(CoreInfo(error=f"{type(e).__name__}: {e}"))
        return
    conn.send(core_info(llm))

    def receive(block: bool) -> list[CoreRequest]:
        msgs = []
        if block:
            conn.poll(None)
        while conn.poll(0):
            msgs.append(conn.recv())  # EOFError: the front end is gone; the process ends
        return msgs

    try:
        run_core(llm, receive, conn.send)
    except (EOFError, BrokenPipeError):
        pass  # the front end is gone: nobody is left to serve


class ProcCore(_Core):
    """The core loop in a child process that builds its own LLM from `config`."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_proc_main, args=(config, child_conn), name="tokenmill-engine-core", daemon=True
        )
        self.process.start()
        child_conn.close()  # else our copy keeps the pipe open and hides the child's death
        try:
            self.info = self._conn.recv()
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
                self.on_output(self._conn.recv())
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
                self._conn.send(msg)
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
