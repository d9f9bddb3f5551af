"""Data parallelism on one node: N engine replicas, each an engine-core process (ProcCore) on its
own GPU, behind the surface the batch job uses from `LLM`.

    batch job                 DataParallelLLM (this process)                 replicas
    ---------                 ------------------------------                 --------
    add_request(id, ids) ---> front queue --dispatch--> CoreRequest(adds) --> ProcCore 0 (GPU 0)
                                                                         --> ProcCore 1 (GPU 1)
    step() <-- finished RequestOutputs <-- OutputAssembler <-- CoreOutput, one per replica step

How many replicas and on which GPUs: replica_plan.py. `make_llm` turns that plan into an engine.

Dispatch rule: a request waits in the front queue, in the order the job added it, until some
replica has fewer than `max_queued` requests outstanding (twice its max_num_seqs: a full batch
running and as many waiting), then goes to the replica with the fewest outstanding tokens
(prompt + max_tokens of its unfinished requests). Rows are held here rather than dealt out up
front, so a replica whose rows finish early (short outputs) takes the next ones: a long-tailed
dataset keeps every replica busy to its end.

Sampling: rows without a seed get one here, drawn from the engine seed in the order the job
adds them, so a sampled run is reproducible whichever replica runs a row (its samples differ from
a one-engine run's, whose seeds come from that engine's own generator).

A replica that dies (a crash, the OOM killer, a kill -9) fails the next `step()` with
ReplicaDiedError naming it; the other replicas are stopped. NOTE: every replica keeps its own
prefix cache, so a prefix shared by rows that land on different replicas is computed once per
replica.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.engine import tokens
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core_messages import CoreOutput, CoreRequest, EngineRequest
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.output_assembler import OutputAssembler
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.replica_plan import plan_for
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.stats import EngineStats

POLL_S = 1.0  # step() re-checks the replicas' health this often while it waits


class ReplicaDiedError(RuntimeError):
    """A data-parallel replica stopped while the job needed it; the message names it."""


def make_llm(
    config: EngineConfig,
    data_parallel_size: int | None = None,
    announce: Callable[[str], None] = lambda line: None,
) -> Any:
    """An `LLM`, or a DataParallelLLM when the plan has several replicas; `announce` gets one
    line naming the choice whenever there was one to make (more than one GPU or replica)."""
    plan = plan_for(config, data_parallel_size)
    if plan.announce:
        announce(f"data parallel: {plan.reason}")
    if plan.size == 1:
        from tokenmill.engine.llm import LLM

        return LLM.from_config(config)
    return DataParallelLLM(config, plan.size, plan.envs, plan.num_threads)


# ---- dealing requests out ----------------------------------------------------------------------
class Dispatcher:
    """Which replica takes the next request: plain ints, no processes (see the module doc)."""

    def __init__(self, num_replicas: int, max_queued: int) -> None:
        self.max_queued = max_queued
        self.num_requests = [0] * num_replicas  # outstanding requests per replica
        self.num_tokens = [0] * num_replicas  # their prompt + max_tokens, summed

    def pick(self) -> int | None:
        """The replica with room and the fewest outstanding tokens; None when all are full."""
        best = None
        for i, num in enumerate(self.num_requests):
            if num < self.max_queued and (
                best is None or self.num_tokens[i] < self.num_tokens[best]
            ):
                best = i
        return best

    def assign(self, replica: int, num_tokens: int) -> None:
        self.num_requests[replica] += 1
        self.num_tokens[replica] += num_tokens

    def release(self, replica: int, num_tokens: int) -> None:
        self.num_requests[replica] -= 1
        self.num_tokens[replica] -= num_tokens


@dataclass
class _Queued:
    req: EngineRequest
    num_tokens: int  # (prompt + max_tokens) * n: the dispatcher's load measure


# ---- the engine --------------------------------------------------------------------------------
class DataParallelLLM:
    """N engine replicas behind the batch job's view of `LLM`: add_request / step /
    abort_request / has_unfinished_requests, tokenizer, encode / encode_batch / encode_chat /
    decode, max_model_len, model_info, stats, config (the same signatures as LLM's).

    `envs[i]` / `num_threads` go to replica i's process (see ProcCore). `make_core(i)` replaces
    the process for tests (a ThreadCore over an in-process LLM). Not thread-safe: one thread
    drives it, as with LLM. `shutdown()` (or leaving a `with` block, or garbage collection)
    stops the replicas.
    """

    def __init__(
        self,
        config: EngineConfig,
        size: int,
        envs: Sequence[dict[str, str]] | None = None,
        num_threads: int | None = None,
        make_core: Callable[[int], Any] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"data_parallel_size must be >= 1 (got {size})")
        envs = list(envs) if envs is not None else [{} for _ in range(size)]
        if make_core is None:
            from tokenmill.engine.core_proc import ProcCore

            def make_core(i: int) -> Any:
                return ProcCore(config, env=envs[i], num_threads=num_threads)

        self.size = size
        self._cores = _start_all(make_core, size)
        self._finalizer = weakref.finalize(self, _shutdown_all, self._cores)
        self._inbox: queue.Queue[tuple[int, CoreOutput | None, str | None]] = queue.Queue()
        for i, core in enumerate(self._cores):
            # Callbacks hold the inbox, not self: the reader threads must not keep self alive.
            core.on_output = lambda msg, i=i, inbox=self._inbox: inbox.put((i, msg, None))
            core.on_dead = lambda why, i=i, inbox=self._inbox: inbox.put((i, None, why))
            core.start()
        info = self._cores[0].info
        self.info = info
        self.model_dir, self.model_name = Path(info.model_dir), info.model_name
        self.max_model_len = info.limits.max_model_len
        replica_config = info.config or config
        # The whole engine runs size x max_num_seqs sequences at once (what the job keeps queued).
        self.config = dataclasses.replace(
            replica_config, max_num_seqs=(replica_config.max_num_seqs or 1) * size
        )
        self.tokenizer = None if config.skip_tokenizer_init else _load_tokenizer(self.model_dir)
        self._processor = InputProcessor(self.tokenizer, info.limits)
        self._assembler = OutputAssembler(self.tokenizer)
        self._dispatcher = Dispatcher(size, 2 * (replica_config.max_num_seqs or 1))
        self._rng = random.Random(config.seed)
        self._stats = [core.info.stats for core in self._cores]
        self._queue: deque[str] = deque()  # request ids in the order added
        self._queued: dict[str, _Queued] = {}  # not dispatched yet (aborts remove them here)
        self._owner: dict[str, tuple[int, int]] = {}  # dispatched: id -> (replica, num_tokens)
        self._failure: str | None = None

    # ---- information ---------------------------------------------------------------------------
    def model_info(self) -> dict:
        """Replica 0's model_info, for the whole group: its device, KV blocks and sequences
        per step summed over the replicas (max_num_seqs: what the batch job keeps queued);
        max_num_batched_tokens stays one replica's step budget."""
        info = dict(self.info.model_info)
        device = str(info.get("device", "?")).split(":")[0]
        info.update(
            model_dir=str(self.model_dir),
            device=f"{device} x{self.size}",
            data_parallel_size=self.size,
            vocab_size=self._processor.limits.vocab_size,
            num_kv_blocks=sum(c.info.model_info.get("num_kv_blocks", 0) for c in self._cores),
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )
        return info

    @property
    def stats(self) -> EngineStats:
        """The replicas' counters summed (as of their last step)."""
        return sum_stats(self._stats)

    @property
    def replica_pids(self) -> list[int | None]:
        return [getattr(getattr(c, "process", None), "pid", None) for c in self._cores]

    # ---- tokens --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return tokens.encode(self.tokenizer, text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text in one tokenizer call (the fast tokenizer's threads)."""
        return tokens.encode_batch(self.tokenizer, texts)

    def decode(self, token_ids: list[int]) -> str:
        return tokens.decode(self.tokenizer, token_ids)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        return tokens.encode_chat(
            self.tokenizer, self.model_name, messages, add_generation_prompt, **template_kwargs
        )

    # ---- the incremental interface -------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        stream: bool = True,
    ) -> None:
        """Queue a request for the next free replica; checks it here, so a bad prompt raises
        now (ValueError), as LLM.add_request does."""
        self._raise_if_failed()
        params = params or SamplingParams()
        if request_id in self._queued or request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self._processor.check_prompt(ids, params, "prompt")
        if params.seed is None:
            params = dataclasses.replace(params, seed=self._rng.getrandbits(62))
        req = EngineRequest(request_id, ids, params, stream=stream, detokenize=True)
        self._queued[request_id] = _Queued(req, (len(ids) + max_tokens) * params.n)
        self._queue.append(request_id)
        self._assembler.add(request_id, ids, params)

    def step(self) -> list[RequestOutput]:
        """The outputs every replica produced since the last call (finished requests, and the
        moving ones added with stream=True). Blocks until a replica reports while any request
        is in flight; raises ReplicaDiedError when a replica stopped."""
        self._raise_if_failed()
        self._dispatch()
        if not self._owner:
            return []
        outputs = []
        for replica, msg, died in self._receive():
            if died is not None:
                self._fail(replica, died)
                continue
            self._stats[replica] = msg.stats
            for rid, why in msg.rejected.items():
                self._fail(replica, f"it refused request {rid!r}: {why}")
            for rid, ids in msg.tokens.items():  # NOTE: empty: replicas' requests detokenize
                self._assembler.apply_tokens(rid, ids)
            for delta in msg.outputs:
                out = self._assembler.apply(delta)
                if out is None:
                    continue  # aborted meanwhile
                if delta.finished:
                    self._release(delta.request_id)
                outputs.append(out)
        self._raise_if_failed()
        self._dispatch()  # refill the replicas that freed room before the caller comes back
        return outputs

    def abort_request(self, request_id: str) -> None:
        """Drop a request, queued or running. Unknown or finished ids are ignored."""
        self._assembler.discard(request_id)
        if self._queued.pop(request_id, None) is not None:
            return  # its id stays in self._queue; _dispatch skips it
        owner = self._owner.get(request_id)
        if owner is not None:
            self._release(request_id)
            self._cores[owner[0]].send(CoreRequest(aborts=[request_id]))

    def has_unfinished_requests(self) -> bool:
        return bool(self._queued or self._owner)

    def shutdown(self) -> None:
        """Stop every replica (idempotent)."""
        self._finalizer()

    def __enter__(self) -> DataParallelLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- helpers -------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        adds: dict[int, list[EngineRequest]] = {}
        while self._queue:
            replica = self._dispatcher.pick()
            if replica is None:
                break
            queued = self._queued.pop(self._queue.popleft(), None)
            if queued is None:
                continue  # aborted while queued
            self._dispatcher.assign(replica, queued.num_tokens)
            self._owner[queued.req.request_id] = (replica, queued.num_tokens)
            adds.setdefault(replica, []).append(queued.req)
        for replica, reqs in adds.items():
            self._cores[replica].send(CoreRequest(adds=reqs))

    def _release(self, request_id: str) -> None:
        replica, num_tokens = self._owner.pop(request_id)
        self._dispatcher.release(replica, num_tokens)

    def _receive(self) -> list[tuple[int, CoreOutput | None, str | None]]:
        """Wait for the first message from any replica, then take all that are waiting."""
        items = []
        while not items:
            try:
                items.append(self._inbox.get(timeout=POLL_S))
            except queue.Empty:
                dead = [i for i, core in enumerate(self._cores) if not core.is_alive]
                if dead:  # its on_dead message (which names the cause) should be here by now
                    time.sleep(0.1)
                    return self._drain() + [(i, None, "it stopped") for i in dead]
        return items + self._drain()

    def _drain(self) -> list[tuple[int, CoreOutput | None, str | None]]:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _fail(self, replica: int, why: str) -> None:
        if self._failure is None:
            pid = self.replica_pids[replica]
            where = f" (pid {pid})" if pid is not None else ""
            self._failure = f"data-parallel replica {replica} of {self.size}{where} stopped: {why}"

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            self.shutdown()  # free the other replicas' GPUs now
            raise ReplicaDiedError(self._failure)


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Counters and gauges summed over replicas; KV-cache usage over all their blocks."""
    total = EngineStats()
    for f in dataclasses.fields(EngineStats):
        if f.name != "kv_cache_usage":
            setattr(total, f.name, sum(getattr(s, f.name) for s in stats))
    if total.num_kv_blocks:
        total.kv_cache_usage = 1.0 - total.num_free_blocks / total.num_kv_blocks
    return total


def _start_all(make_core: Callable[[int], Any], size: int) -> list[Any]:
    """Start the replicas at once (each loads its model); if any fails, stop the rest."""
    with ThreadPoolExecutor(size, thread_name_prefix="tokenmill-dp-start") as pool:
        futures = [pool.submit(make_core, i) for i in range(size)]
    cores, errors = [], []
    for i, future in enumerate(futures):
        try:
            cores.append(future.result())
        except Exception as e:  # noqa: BLE001 - reported below, with the replica's number
            errors.append(f"replica {i}: {e}")
    if errors:
        _shutdown_all(cores)
        raise RuntimeError(f"data-parallel replicas could not start: {'; '.join(errors)}")
    return cores


def _shutdown_all(cores: list[Any], timeout: float = 10.0) -> None:
    for core in cores:  # ask all first, so they stop together
        core.stopping = True
        core.send(CoreRequest(shutdown=True))
    for core in cores:
        core.shutdown(timeout)


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
