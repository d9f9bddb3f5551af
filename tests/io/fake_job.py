"""Run the real batch job in a real process with FakeEngine (no torch: starts in a fraction of a
second), so durability tests can kill it, fill its disk or break it at chosen points.

    python tests/io/fake_job.py '{"input": ..., "output": ..., "window_rows": 40}' [OPTIONS]

    --step-delay S        sleep S seconds per engine step (time to kill from outside)
    --finish-log PATH     append each finished request id to PATH (unbuffered), before the job
                          sees it: the ground truth of what the engine computed
    --die-at-step K       SIGKILL itself at the start of engine step K
    --die-at POINT        SIGKILL itself at a point of the Parquet finalize (see DIE_POINTS)
    --signal-at POINT     send itself SIGTERM twice at that point, then carry on
    --die-after-part K    SIGKILL itself right after a store output's K-th part is written,
                          before the manifest lists it (store.py)
    --die-at-store POINT  SIGKILL itself at a point of a store output's end (STORE_DIE_POINTS)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

from io_fakes import FakeEngine  # noqa: E402

from tokenmill.engine.sampling_params import SamplingParams  # noqa: E402
from tokenmill.io import store, target, writers  # noqa: E402
from tokenmill.io.job import JobConfig, run_job  # noqa: E402

STAT_COUNTERS = (
    "num_steps",
    "num_scheduled_seqs_total",
    "num_prompt_tokens",
    "num_generated_tokens",
    "num_preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
)
# Points of the Parquet finalize, in order.
DIE_POINTS = (
    "mid_join",  # OUTPUT.tmp half written, not yet renamed
    "joined_before_journal",  # OUTPUT renamed into place, journal not yet at "joined"
    "joined",  # journal at "joined", no part deleted yet
    "mid_cleanup",  # half of the parts deleted
    "cleaned_before_journal",  # parts gone, journal still at "joined"
    "cleaned",  # journal at "cleaned", not yet marked finished
)

# Points of a store output's end, in order.
STORE_DIE_POINTS = (
    "joined_before_manifest",  # OUTPUT (and the errors file) uploaded, manifest not at "joined"
    "joined",  # manifest at "joined", parts not yet deleted
    "cleaned",  # parts deleted, manifest at "cleaned", not yet finished
)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(point: str, args) -> None:
    if args.die_at == point:
        die()
    if args.signal_at == point:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)


def patch_finalize(args) -> None:
    join, rmtree, save = writers.join_parquet, writers.shutil.rmtree, target.save_journal

    def join_parquet(parts, path):
        if args.die_at == "mid_join":
            Path(str(path) + ".tmp").write_bytes(b"PAR1 half a file")
        hit("mid_join", args)
        join(parts, path)
        hit("joined_before_journal", args)

    def rmtree_half(path):
        parts = sorted(Path(path).iterdir())
        for part in parts[: len(parts) // 2]:
            part.unlink()
        hit("mid_cleanup", args)
        rmtree(path)

    def save_journal(output, state):
        stage = state.output.get("stage")
        if stage == "cleaned" and not state.finished:
            hit("cleaned_before_journal", args)
        save(output, state)
        if stage == "joined":
            hit("joined", args)
        if stage == "cleaned" and not state.finished:
            hit("cleaned", args)

    writers.join_parquet = join_parquet
    writers.shutil.rmtree = rmtree_half
    target.save_journal = save_journal


def patch_parts(args) -> None:
    commit = store.PartsWriter.commit

    def commit_then_die(self):
        state = commit(self)
        if self.num_parts == args.die_after_part:
            die()
        return state

    store.PartsWriter.commit = commit_then_die
    join_errors, save = store.PartsWriter._join_errors, store.StoreTarget.save_journal

    def join_errors_then_die(self):
        join_errors(self)
        if args.die_at_store == "joined_before_manifest":
            die()

    def save_then_die(self, state):
        save(self, state)
        if (
            args.die_at_store
            and args.die_at_store == state.output.get("stage")
            and not state.finished
        ):
            die()

    store.PartsWriter._join_errors = join_errors_then_die
    store.StoreTarget.save_journal = save_then_die


class ScriptedEngine(FakeEngine):
    def __init__(self, args):
        # EngineStats' counters without importing the engine (torch): start-up stays ~0.4 s.
        stats = SimpleNamespace(**{name: 0 for name in STAT_COUNTERS})
        super().__init__(256, args.finish_per_step, args.seed, stats=stats)
        self.args = args
        self.steps = 0
        self.log = (
            os.open(args.finish_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            if (args.finish_log)
            else None
        )

    def step(self):
        self.steps += 1
        if self.steps == self.args.die_at_step:
            die()
        time.sleep(self.args.step_delay)
        outs = super().step()
        if self.log is not None:
            os.write(self.log, "".join(f"{o.request_id}\n" for o in outs).encode())
        return outs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--finish-per-step", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finish-log")
    parser.add_argument("--die-at-step", type=int, default=0)
    parser.add_argument("--die-at", choices=DIE_POINTS)
    parser.add_argument("--signal-at", choices=DIE_POINTS)
    parser.add_argument("--die-after-part", type=int, default=0)
    parser.add_argument("--die-at-store", choices=STORE_DIE_POINTS)
    args = parser.parse_args()
    patch_finalize(args)
    patch_parts(args)
    config = json.loads(args.config)
    config["sampling"] = SamplingParams(temperature=0, max_tokens=3)
    config.setdefault("quiet", True)
    config["keep_columns"] = tuple(config.get("keep_columns", ()))
    return run_job(JobConfig(**config), lambda _: ScriptedEngine(args))


if __name__ == "__main__":
    sys.exit(main())
