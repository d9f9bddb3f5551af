"""Tensor-parallel processes: rank 0 is the engine, ranks 1..N-1 are workers that follow it.

    engine process (rank 0)                          worker process (rank r), spawned
    ------------------------                         ---------------------------------
    Scheduler.schedule() -> SchedulerOutput
    send StepMessage over each worker's pipe  --->   recv StepMessage
    ModelRunner.execute_async (rank 0's shard)       ModelRunner.execute_async (rank r's shard)
        all-reduce / all-gather   <=========== torch.distributed ===========>
        sample, broadcast tokens  ================>  keep them (next step's placeholders)
    collect, update the scheduler                    (nothing to collect)

Every rank runs the same forward over the same flattened batch, so the collectives pair up;
only rank 0 samples, and its broadcast keeps the workers' copy of the sampled tokens in step
(overlapped steps fill their input placeholders from it). A step is sent once, as plain data
(StepMessage); the workers never see the Request objects. A worker that dies makes the next
collective on rank 0 fail (gloo) or the next step's liveness check trip: the engine raises a
RuntimeError naming the rank rather than waiting on it.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import traceback
import weakref
from dataclasses import dataclass

import torch

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.model_runner import ModelRunner, resolve_device
from tokenmill.engine.parallel import TensorParallel, make_group, make_store
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import ScheduledSeq, SchedulerOutput

# NOTE: how long a rank waits in a collective or at the rendezvous. Loading a large model's
# shards can keep one rank from the first collective for minutes.
GROUP_TIMEOUT_S = float(os.environ.get("TOKENMILL_TP_TIMEOUT_S", 1800))


@dataclass
class SeqMessage:
    """What a worker needs of one ScheduledSeq (the prompt only when prompt logprobs run)."""

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    prompt_logprobs: int | None
    prompt_token_ids: list[int] | None
    long_rope: bool = False  # Phi-3: positions turn by the long factors (Request.long_rope)


StepMessage = list[SeqMessage]


def step_message(sched: SchedulerOutput) -> StepMessage:
    msg = []
    for s in sched.seqs:
        n = s.req.params.prompt_logprobs
        prompt = s.req.prompt_token_ids if n is not None else None
        long_rope = getattr(s.req, "long_rope", False)
        msg.append(
            SeqMessage(
                s.req_id, s.token_ids, s.start_pos, s.block_ids, s.sample, n, prompt, long_rope
            )
        )
    return msg


def scheduler_output_of(msg: StepMessage) -> SchedulerOutput:
    """A SchedulerOutput the worker's runner can execute: the same batch, stand-in requests."""
    seqs = []
    for m in msg:
        params = SamplingParams(prompt_logprobs=m.prompt_logprobs)
        req = Request(m.req_id, m.prompt_token_ids or [], params, seed=0, max_tokens=1)
        req.long_rope = m.long_rope  # the runner offsets such a request's positions
        seqs.append(ScheduledSeq(m.req_id, m.token_ids, m.start_pos, m.block_ids, m.sample, req))
    return SchedulerOutput(seqs)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _worker_main(rank, size, port, config, hf_config, model_dir, max_model_len, conn) -> None:
    """Rank `rank`: build this rank's runner, then run every step rank 0 sends until None or
    a closed pipe."""
    try:
        conn.send(("started", None))
        device = _rank_device(config, rank)
        store = make_store(rank, size, port, GROUP_TIMEOUT_S)
        group = make_group(_backend(device), store, rank, size, GROUP_TIMEOUT_S)
        tp = TensorParallel(rank, size, group)
        runner = ModelRunner(config, hf_config, model_dir, max_model_len, tp, device)
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            runner.execute_async(scheduler_output_of(msg))
    except EOFError:
        return  # rank 0 is gone
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None


class Workers:
    """Rank 0's handle on the worker processes of ranks 1..N-1."""

    def __init__(self, procs: list, conns: list):
        self.procs = procs
        self.conns = conns
        self.closed = False

    def send(self, msg: StepMessage) -> None:
        self.check()
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(msg)
            except OSError as e:
                raise self.failure() or RuntimeError(f"tensor-parallel rank {rank}: {e}") from e

    def check(self) -> None:
        err = self.failure()
        if err is not None:
            raise err

    def failure(self) -> RuntimeError | None:
        """A clear error if a worker has died (or reported one), else None."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            detail = ""
            try:
                while conn.poll(0):
                    kind, text = conn.recv()
                    if kind == "error":
                        detail = f":\n{text}"
            except (EOFError, OSError):
                pass
            if detail or not proc.is_alive():
                proc.join(1)
                return RuntimeError(
                    f"tensor-parallel worker rank {rank} (pid {proc.pid}) failed (exit code "
                    f"{proc.exitcode}){detail}; the engine cannot continue without it: start a "
                    "new one"
                )
        return None

    def wait_for(self, expected: str) -> None:
        """Wait until every worker reports `expected` ("started", "ready"), or raise if one
        dies or reports an error first."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive() and not conn.poll(0):
                    proc.join(1)
                    raise RuntimeError(
                        f"tensor-parallel worker rank {rank} could not start: it exited with "
                        f"code {proc.exitcode}"
                    )
            try:
                kind, text = conn.recv()
            except EOFError:
                kind, text = "error", f"it exited with code {proc.exitcode}"
            if kind != expected:
                raise RuntimeError(f"tensor-parallel worker rank {rank} could not start: {text}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


class DriverRunner(ModelRunner):
    """Rank 0's runner: sends each step to the workers, then runs its own shard of it."""

    def __init__(self, *args, workers: Workers, **kwargs):
        self.workers = workers
        super().__init__(*args, **kwargs)

    def execute_async(self, sched: SchedulerOutput, defer_sampling: bool = False):
        self.workers.send(step_message(sched))
        try:
            return super().execute_async(sched, defer_sampling)
        except Exception as e:
            self._raise_failure(e)

    def sample_async(self, pending) -> None:
        try:  # the workers wait in the token broadcast meanwhile
            super().sample_async(pending)
        except Exception as e:
            self._raise_failure(e)

    def collect(self, pending):
        try:
            return super().collect(pending)
        except Exception as e:
            self._raise_failure(e)

    def _raise_failure(self, e: Exception):
        """A collective failed: blame the dead worker if there is one, else re-raise e."""
        err = self.workers.failure()
        if err is None:
            raise e
        raise err from e

    def close(self) -> None:
        """Stop the workers (also done at exit)."""
        self.workers.close()


def start_tensor_parallel(
    config: EngineConfig, hf_config, model_dir, max_model_len: int
) -> DriverRunner:
    """Start ranks 1..N-1, join them in a process group, and return rank 0's runner."""
    size = config.tensor_parallel_size
    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} GPUs but {torch.cuda.device_count()} "
            "are visible (CUDA_VISIBLE_DEVICES); lower --tensor-parallel-size"
        )
    device = _rank_device(config, 0)
    store = make_store(0, size, 0, GROUP_TIMEOUT_S)
    # NOTE: forkserver, not fork (CUDA and threads do not survive a fork) nor plain spawn: the
    # server process imports torch and the engine once, and every later worker (of this engine
    # or of the next one) forks from it in milliseconds instead of importing for seconds.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, type(hf_config).__module__])  # config: 2 s of imports
    procs, conns = [], []
    # NOTE: an engine inside a daemonic process (the server's engine core) may not start
    # daemonic children; its workers then end when their pipe closes.
    daemon = not mp.current_process().daemon
    for rank in range(1, size):
        conn, child_conn = ctx.Pipe()
        args = (rank, size, store.port, config, hf_config, model_dir, max_model_len, child_conn)
        proc = ctx.Process(
            target=_worker_main, args=args, name=f"tokenmill-tp-{rank}", daemon=daemon
        )
        proc.start()
        child_conn.close()  # else our copy keeps the pipe open and hides the child's death
        procs.append(proc)
        conns.append(conn)
    workers = Workers(procs, conns)
    try:
        workers.wait_for("started")
        group = make_group(_backend(device), store, 0, size, GROUP_TIMEOUT_S)
        tp = TensorParallel(0, size, group)
        runner = DriverRunner(
            config, hf_config, model_dir, max_model_len, tp, device, workers=workers
        )
        workers.wait_for("ready")
    except ValueError:  # the model does not split (heads, vocab): every rank says the same
        workers.close()
        raise
    except BaseException as e:
        err = workers.failure()
        workers.close()
        if err is not None:
            raise err from e
        raise
    runner.store = store  # the rendezvous store must outlive the group
    # NOTE: atexit, registered after multiprocessing's own exit hook, runs before it: that
    # hook joins non-daemonic children, which would wait forever on workers never told to stop.
    atexit.register(workers.close)
    weakref.finalize(runner, workers.close).atexit = False  # and when the engine goes
    return runner
