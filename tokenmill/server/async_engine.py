"""An asyncio front over the one LLM: a single engine thread, one output queue per request.

    handlers (event loop)                      engine thread (owns the LLM)
    ---------------------                      ----------------------------
    add(req_id, prompt, params) --command-->   drain commands: add_request / abort_request / call
         await future  <----------------------   set the future (or its ValueError)
    async for out in stream(req_id)            outputs = llm.step()
         await queue.get() <-call_soon_threadsafe- push each RequestOutput to its request's queue

The LLM is not thread-safe, so every call into it (tokenizer included: HF fast tokenizers raise
"Already borrowed" when two threads use one instance) runs on the engine thread, between steps.
The thread sleeps on a condition when there is neither a command nor an unfinished request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (it crashed or the server is shutting down)."""


@dataclass
class EngineSnapshot:
    """Engine state copied on the engine thread after each step, for /metrics and /health."""

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
    num_aborted_requests: int = 0


@dataclass
class _Command:
    """Work for the engine thread: `run` between steps, or `fail` if the engine is gone."""

    run: Callable[[], None]
    fail: Callable[[BaseException], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Owns the LLM on one thread; handlers talk to it through `add`, `stream`, `abort`, `call`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.snapshot = EngineSnapshot()
        self._commands: deque[_Command] = deque()
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._num_aborted = 0
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._take_snapshot()

    # Lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # Handler side (event loop) ----------------------------------------------------------------

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(llm) on the engine thread between steps; return its result or raise its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.llm)
            except Exception as e:  # handed to the caller, who turns it into an HTTP error
                _call_threadsafe(loop, _set_exception, future, e)
            else:
                _call_threadsafe(loop, _set_result, future, result)

        def fail(error: BaseException) -> None:
            _call_threadsafe(loop, _set_exception, future, error)

        self._submit(_Command(run, fail))
        return await future

    async def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        queue: asyncio.Queue,
        stream: bool = True,
    ) -> None:
        """Add a request whose outputs go to `queue` (several requests may share one).

        `stream=False` lets the engine decode the text once at the end, as LLM.generate does.
        Raises the engine's ValueError (bad prompt, too long) here, before any output.
        """
        target = _Stream(asyncio.get_running_loop(), queue)

        def add_request(llm: Any) -> None:
            self._streams[request_id] = target
            try:
                llm.add_request(request_id, prompt_token_ids, params, stream=stream)
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        await self.call(add_request)

    async def stream(
        self, request_ids: list[str], queue: asyncio.Queue
    ) -> AsyncIterator[RequestOutput]:
        """Yield the requests' RequestOutputs until all finish. Leaving early aborts the rest."""
        unfinished = set(request_ids)
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            for request_id in unfinished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone); its KV blocks are freed before the next step."""

        def abort_request() -> None:
            if self._streams.pop(request_id, None) is not None:
                self.llm.abort_request(request_id)
                self._num_aborted += 1

        try:
            self._submit(_Command(abort_request, lambda error: None))
        except EngineDeadError:
            pass

    def _submit(self, command: _Command) -> None:
        with self._cond:
            if self._stopped or self._error is not None:
                raise EngineDeadError(
                    f"the engine is not running ({self._error!r}); restart the server"
                    if self._error is not None
                    else "the server is shutting down"
                )
            self._commands.append(command)
            self._cond.notify()

    # Engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                commands = self._wait_for_work()
                if commands is None:
                    break
                for command in commands:
                    command.run()
                if self.llm.has_unfinished_requests():
                    self._deliver(self.llm.step())
                self._take_snapshot()
        except BaseException as e:  # a crash must reach every waiting request, not hang them
            logger.exception("engine thread crashed")
            self._error = e
            self._fail_all(EngineDeadError(f"the engine crashed: {e!r}"))
        else:
            self._fail_all(EngineDeadError("the server is shutting down"))

    def _wait_for_work(self) -> list[_Command] | None:
        with self._cond:
            while (
                not self._stopped
                and not self._commands
                and not (self.llm.has_unfinished_requests())
            ):
                self._cond.wait()
            if self._stopped:
                return None
            commands = list(self._commands)
            self._commands.clear()
            return commands

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if out.finished:
                del self._streams[out.request_id]
            _put_threadsafe(stream, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            self._stopped = True
            commands = list(self._commands)
            self._commands.clear()
        for stream in self._streams.values():
            _put_threadsafe(stream, error)
        self._streams.clear()
        for command in commands:
            command.fail(error)

    def _take_snapshot(self) -> None:
        llm, stats = self.llm, self.llm.stats
        self.snapshot = EngineSnapshot(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            num_kv_blocks=llm.num_kv_blocks,
            num_free_blocks=llm.num_free_blocks,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_generated_tokens=stats.num_generated_tokens,
            num_preemptions=stats.num_preemptions,
            num_steps=stats.num_steps,
            num_scheduled_seqs_total=stats.num_scheduled_seqs_total,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_aborted_requests=self._num_aborted,
        )


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _call_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is already closed (server shutting down)
        pass


def _put_threadsafe(stream: _Stream, item: Any) -> None:
    _call_threadsafe(stream.loop, stream.queue.put_nowait, item)
