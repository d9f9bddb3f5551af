"""The server's side of the engine core: asyncio queues per request, tokenizing off the loop.

    handlers (event loop)                       engine core (own process, or a thread)
    ---------------------                       --------------------------------------
    prepare(...)  -> tokenizer worker thread    (InputProcessor: tokenize + check)
    add(requests) --CoreRequest(adds)------->   all added before the same step
    async for out in stream(ids)  <-- one CoreOutput per step, dispatched on the loop
    abort(ids)    --CoreRequest(aborts)----->   KV blocks freed before the next step

The core never sees text: prompts are tokenized here, on worker threads with their own
tokenizer (so a big prompt never blocks the event loop, and the engine's own tokenizer is never
shared between threads). `EngineDeadError` reaches every waiting request as soon as the core
stops; `on_dead` lets the server exit.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core_messages import CoreOutput, CoreRequest, EngineRequest
from tokenmill.engine.core_proc import ProcCore, ThreadCore
from tokenmill.engine.input_processor import InputError, InputProcessor
from tokenmill.engine.output_assembler import OutputAssembler
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.stats import EngineStats

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM

logger = logging.getLogger(__name__)

NUM_TOKENIZER_THREADS = 2
# Requests whose body is at most this many bytes are prepared on the event loop itself: their
# tokenizing takes at most ~3 ms (about 0.45 ms per kB of text), less than the trip through a
# tokenizer thread costs under load. Seen on an H200 (benchmarks/RESULTS.md, fifth session):
# with every request sent to a thread, a burst of 256 nano requests reached the engine in one
# clump 0.6 s after the first, because the loop parsed every arriving request before it ran
# any thread's completion callback. Bigger bodies still go to a thread, so a 5 MB prompt never
# stalls the streams.
INLINE_PREPARE_BYTES = 8 * 1024


class EngineDeadError(RuntimeError):
    """The engine core stopped (it crashed, was killed, or the server is shutting down)."""


class AsyncEngine:
    """The handlers' view of one engine core: `prepare`, `add`, `stream`, `abort`."""

    def __init__(self, core: Any, max_prompt_bytes: int | None = None) -> None:
        self.core = core
        self.info = core.info
        self.limits = core.info.limits
        self.stats: EngineStats = core.info.stats
        self.num_aborted = 0
        self.on_dead: Callable[[str], None] = lambda message: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        # Requests whose live output sits in their queue, not yet taken: a new step's tokens
        # only extend it (the consumer reads everything new when it looks), no second item.
        self._signalled: set[str] = set()
        self._assembler: OutputAssembler | None = None  # made with the tokenizer, below
        self._error: str | None = None
        self._max_prompt_bytes = max_prompt_bytes
        self._local = threading.local()
        self._tokenizer_lock = threading.Lock()
        self._tokenizer = _load_tokenizer(core.info.model_dir)
        # The event loop's own tokenizer copy: streamed text is decoded here, not in the core.
        self._assembler = OutputAssembler(copy.deepcopy(self._tokenizer))
        self._pool = ThreadPoolExecutor(NUM_TOKENIZER_THREADS, thread_name_prefix="tokenizer")
        core.on_output, core.on_dead = self._on_output, self._on_dead

    @classmethod
    def in_process(cls, config: EngineConfig, **kw: Any) -> AsyncEngine:
        """The engine core in its own process (loads the model there; blocks until loaded)."""
        return cls(ProcCore(config), **kw)

    @classmethod
    def in_thread(cls, llm: LLM, **kw: Any) -> AsyncEngine:
        """The engine core on a thread of this process, over `llm`. NOTE: an LLM, not any
        EngineClient: the core reads token-only streams from the LLM's request records."""
        return cls(ThreadCore(llm), **kw)

    # Lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.start()
        # a tokenizer copy for the loop (small requests) and one thread, before the first call
        self._pool.submit(lambda: self.input_processor)
        self.input_processor  # noqa: B018

    def shutdown(self, timeout: float = 10.0) -> None:
        self.core.shutdown(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_alive(self) -> bool:
        return self._error is None and self.core.is_alive

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    # Inputs (tokenizer threads) ---------------------------------------------------------------
    @property
    def input_processor(self) -> InputProcessor:
        """This thread's InputProcessor, with its own tokenizer."""
        proc = getattr(self._local, "proc", None)
        if proc is None:
            with self._tokenizer_lock:  # one copy per thread; copying is not thread-safe
                tokenizer = copy.deepcopy(self._tokenizer)
            proc = InputProcessor(tokenizer, self.limits, self._max_prompt_bytes)
            self._local.proc = proc
        return proc

    async def prepare(
        self, fn: Callable[[InputProcessor], Any], body_bytes: int | None = None
    ) -> Any:
        """Run fn(input_processor): on the event loop for a request body of at most
        INLINE_PREPARE_BYTES, else (or when the size is unknown) on a tokenizer thread.
        Its InputError propagates."""
        if body_bytes is not None and body_bytes <= INLINE_PREPARE_BYTES:
            return fn(self.input_processor)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self.input_processor))

    # Requests (event loop) --------------------------------------------------------------------
    def add(self, requests: list[EngineRequest], queue: asyncio.Queue) -> None:
        """Queue requests whose outputs go to `queue`; the core adds them all before one step."""
        if not self.is_alive:
            raise EngineDeadError(self._error or "the engine is not running")
        for r in requests:
            self._queues[r.request_id] = queue
            self._assembler.add(r.request_id, r.prompt_token_ids, r.params, r.detokenize)
        self.core.send(CoreRequest(adds=requests))

    async def stream(
        self, request_ids: list[str], queue: asyncio.Queue
    ) -> AsyncIterator[RequestOutput]:
        """Yield the requests' RequestOutputs until all finish. Leaving early aborts the rest.

        Outputs are live and cumulative (see OutputAssembler): when several steps arrived
        since the last look, each request is yielded once, with all its new tokens. So a
        consumer slower than the engine sends fewer, bigger chunks instead of falling behind.
        """
        unfinished = set(request_ids)
        try:
            while unfinished:
                outs = await _take_all(queue)
                for out in outs:
                    self._signalled.discard(out.request_id)
                for out in outs:
                    self._assembler.refresh(out)
                    if out.finished:
                        unfinished.discard(out.request_id)
                    yield out
        finally:
            self.abort(list(unfinished))

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (client gone); their KV blocks are freed before the next step."""
        live = [rid for rid in request_ids if self._queues.pop(rid, None) is not None]
        for rid in live:
            self._assembler.discard(rid)
            self._signalled.discard(rid)
        if live and self.is_alive:
            self.num_aborted += len(live)
            self.core.send(CoreRequest(aborts=live))

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        """Abort every request in flight; their handlers get EngineDeadError(reason) (a 503,
        or an error event in a stream) instead of waiting for outputs that will not come."""
        error = EngineDeadError(reason)
        for queue in {id(q): q for q in self._queues.values()}.values():
            queue.put_nowait(error)
        self.abort(list(self._queues))

    # Core callbacks (core / reader thread -> event loop) ---------------------------------------
    def _on_output(self, msg: CoreOutput) -> None:
        self._call_soon(self._deliver, msg)

    def _on_dead(self, message: str) -> None:
        self._call_soon(self._fail_all, message)

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _deliver(self, msg: CoreOutput) -> None:
        self.stats = msg.stats
        for rid, message in msg.rejected.items():
            queue = self._queues.pop(rid, None)
            self._assembler.discard(rid)
            if queue is not None:
                queue.put_nowait(InputError(message))
        signalled = self._signalled
        for rid, ids in msg.tokens.items():  # the hot path: one-completion token streams
            out = self._assembler.apply_tokens(rid, ids)
            if out is None or rid in signalled:  # aborted, or already waiting in its queue
                continue
            queue = self._queues.get(rid)
            if queue is not None:
                signalled.add(rid)
                queue.put_nowait(out)
        for delta in msg.outputs:
            rid = delta.request_id
            queue = self._queues.get(rid)
            out = self._assembler.apply(delta)
            if queue is None or out is None:  # aborted meanwhile
                continue
            if out.finished:
                del self._queues[rid]
                signalled.discard(rid)
            elif rid in signalled:
                continue
            else:
                signalled.add(rid)
            queue.put_nowait(out)

    def _fail_all(self, message: str) -> None:
        if self._error is not None:
            return
        self._error = message
        error = EngineDeadError(message)
        for queue in {id(q): q for q in self._queues.values()}.values():
            queue.put_nowait(error)
        self._queues.clear()
        self._signalled.clear()
        if not self.core.stopping:
            self.on_dead(message)


async def _take_all(queue: asyncio.Queue) -> list[RequestOutput]:
    """Wait for one item, then take every item already queued; one entry per request."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    latest: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            raise item
        latest[item.request_id] = item
    return list(latest.values())


def _load_tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, or None if it has none (then prompts must be token ids).
    NOTE: call it on the main thread: transformers' lazy imports are not thread-safe."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer in %s (%s): only token-id prompts will work", model_dir, e)
        return None
