"""`tokenmill generate` as a library call: JobConfig in, exit code out.

    run_job(config, make_llm) ── open input ── lock OUTPUT ── check / resume journal ── load engine
                              └─ Batcher (window loop) ── spill + writer + journal commits ── report

Durability (README "Resume" states the guarantees):
- One run per output: OUTPUT.lock (lock.py) is held from before the journal is read to the end.
- Each row is appended to OUTPUT.spill (spill.py) the moment it finishes, in any order; a rerun
  replays those instead of recomputing them.
- Results are appended to the output in input order; every `commit_s` seconds (and at the end,
  and when stopping) the writers fsync and then the journal records how many rows are done and
  the output's committed state. A restart checks the output against it (resume.py), cuts it back
  to it and skips the rows it lists, so the finished output holds every input row exactly once
  whatever killed the earlier run.
- The end (Parquet: joining the parts) records each stage in the journal and replays from the
  last one; SIGINT / SIGTERM wait for it.
- Any other failure (disk full, Arrow, the engine) ends the run with one line, exit code 3 and a
  report of what is committed.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tokenmill.engine.client import EngineClient
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io import exit_codes
from tokenmill.io.batcher import Batcher
from tokenmill.io.format import format_result
from tokenmill.io.fs import StoreError, is_url, store_error
from tokenmill.io.journal import JournalState, Totals
from tokenmill.io.lock import OutputLocked
from tokenmill.io.parse import RowParser, resolve_as_chat
from tokenmill.io.preflight import PreflightError, check_model_dir, check_rows
from tokenmill.io.progress import Progress
from tokenmill.io.readers import InputError, InputSource, open_input
from tokenmill.io.report import build_report, print_report, report_warnings, stats_snapshot
from tokenmill.io.resume import ResumeRefused, errors_path, resume_state
from tokenmill.io.rows import RawRecord, RowResult
from tokenmill.io.shard import Shard
from tokenmill.io.spill import FinishedRow, Spill
from tokenmill.io.store import StoreTarget
from tokenmill.io.target import LocalTarget, default_output, open_target
from tokenmill.io.text import unencodable_field, writable
from tokenmill.io.writers import OutputError

Target = LocalTarget | StoreTarget

DEFAULT_WINDOW_ROWS = 20_000


@dataclass
class JobConfig:
    """Everything one `tokenmill generate` run needs (the CLI builds this and nothing else)."""

    input: str
    output: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    split: str | None = None
    limit: int | None = None
    id_column: str | None = None
    prompt_column: str | None = None
    as_chat: bool | None = None  # template plain text prompts too; None: if the model has one
    keep_columns: tuple[str, ...] = ()
    window_rows: int = DEFAULT_WINDOW_ROWS
    sort: bool = True
    shard: Shard = field(default_factory=Shard)
    overwrite: bool = False
    fail_fast: bool = False
    progress_interval_s: float = 30.0
    commit_s: float = 5.0
    rich_progress: bool | None = None  # None: when stdout is a terminal
    quiet: bool = False
    command_line: str = ""
    data_parallel_size: int | None = field(
        default=None,
        metadata={
            "help": "Engine replicas, one process per GPU, sharing the rows (default: every "
            "visible GPU when the model fits one, 1 on CPU)."
        },
    )


class CannotRun(Exception):
    """The job cannot start (exit code CANNOT_RUN); the message says what to do."""


def run_job(
    config: JobConfig, make_llm: Callable[[EngineConfig], EngineClient] | None = None
) -> int:
    """Run the job; returns an exit code from tokenmill.io.exit_codes."""
    try:
        default = partial(_default_llm, data_parallel_size=config.data_parallel_size)
        return _Job(config, make_llm or default).run()
    except OutputLocked as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return exit_codes.LOCKED
    except (CannotRun, InputError, PreflightError, ResumeRefused, StoreError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    except OSError as e:  # reading the journal or the lock: a store out of reach, a permission
        if config.output and is_url(config.output):
            e = store_error(e, config.output, "use")
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return exit_codes.CANNOT_RUN


def _one_line(e: BaseException) -> str:
    """Messages quote exceptions (pyarrow's span lines): one line, whatever they hold."""
    return " ".join(str(e).split())


def _default_llm(
    engine_config: EngineConfig, data_parallel_size: int | None = None
) -> EngineClient:
    from tokenmill.engine.data_parallel import make_llm

    return make_llm(engine_config, data_parallel_size, lambda line: print(line, file=sys.stderr))


class _Job:
    def __init__(self, config: JobConfig, make_llm: Callable[[EngineConfig], EngineClient]):
        self.config = config
        self.make_llm = make_llm
        self.stop_reason: str | None = None
        self.finalizing = False  # signals no longer stop the run
        # Rows this run released from the spill (finished by a killed run): not this run's work.
        self.replayed = Totals()
        self.spill: Spill | None = None

    # The run, top to bottom ------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        source = open_input(cfg.input, split=cfg.split, limit=cfg.limit)
        output = open_target(cfg.output or default_output(cfg.input, cfg.shard))
        output.check(source)
        check_rows(self._shard_total(source), source.description)
        check_model_dir(cfg.engine.model)
        lock = output.lock(cfg.command_line)
        try:
            lock.acquire()
        except OSError as e:
            raise CannotRun(f"cannot create the lock file beside {output.name}: {e}") from e
        try:
            return self._run_locked(source, output)
        finally:
            self._try(lock.release)

    def _run_locked(self, source: InputSource, output: Target) -> int:
        cfg = self.config
        state = resume_state(output, self._fingerprint(source, output), cfg.overwrite)
        if state.finished:
            return self._already_done(output, state)
        try:
            llm = self.make_llm(cfg.engine)
        except Exception as e:  # noqa: BLE001 - any load failure means "could not run"
            raise CannotRun(
                f"could not load the model {cfg.engine.model or '(default)'}: {e}"
            ) from e
        state.runs += 1
        try:
            output.save_journal(state)  # before the output exists: a crash from here resumes
            self.spill = output.spill(state.fingerprint)
            replayed = self.spill.open(state.rows_done)
            writer = output.open_writer(state.output)
            errors = output.open_errors(state.errors_bytes, writer)
        except (OSError, OutputError) as e:
            raise CannotRun(
                f"cannot write beside {output.name} ({_one_line(f'{type(e).__name__}: {e}')}); "
                "fix the cause and rerun the same command"
            ) from e
        t0, skipped = time.monotonic(), state.rows_done
        stats0 = stats_snapshot(llm)
        totals0 = asdict(state.totals)
        failure: BaseException | None = None
        with (
            self._signals(),
            Progress(
                self._shard_total(source),
                state.rows_done,
                cfg.progress_interval_s,
                self._use_rich(),
                enabled=not cfg.quiet,
                generated_tokens=_generated_since(llm, stats0),
            ) as progress,
        ):
            try:
                self._loop(llm, source, state, writer, errors, output, progress, replayed)
                self._commit(output, state, writer, errors)
                if self.stop_reason is None:
                    self._finalize(output, state, writer)
            except Exception as e:  # noqa: BLE001 - keep what is done, report, exit 3
                failure = e
                if not isinstance(e, (OSError, OutputError)):  # the output itself is fine
                    self._try(lambda: self._commit(output, state, writer, errors))
                else:  # writing failed: what is done is what the last commit recorded
                    state = self._try(output.load_journal) or state
            except KeyboardInterrupt:  # a second Ctrl-C: the journal is consistent as it is
                failure = KeyboardInterrupt()
        self._try(writer.close)
        self._try(lambda: errors.close(remove_if_empty=state.finished))
        self.spill.close(remove=state.finished)
        if isinstance(failure, KeyboardInterrupt):
            print("stopped at once; rerun the same command to resume", file=sys.stderr)
            return exit_codes.INTERRUPTED
        report = self._try(
            lambda: self._report(
                output, llm, state, skipped, time.monotonic() - t0, stats0, totals0
            )
        )
        if failure is not None:
            print(_failure_line(failure, output, state.rows_done), file=sys.stderr)
            return exit_codes.CANNOT_RUN
        if report is None:
            print(f"error: could not write {output.report_name} (see above)", file=sys.stderr)
            return exit_codes.CANNOT_RUN
        return self._exit_code(state, output)

    def _loop(
        self,
        llm: EngineClient,
        source: InputSource,
        state: JournalState,
        writer,
        errors,
        output: Target,
        progress: Progress,
        replayed: dict[int, FinishedRow],
    ) -> None:
        parser = RowParser(
            self.config.sampling,
            self.config.prompt_column,
            self.config.id_column,
            self.config.keep_columns,
            as_chat=resolve_as_chat(self.config.as_chat, llm),
        )
        model = llm.model_info().get("model", str(self.config.engine.model))
        batcher = Batcher(
            llm,
            parser,
            self.config.window_rows,
            sort=self.config.sort,
            on_finish=lambda position, result: self._finished(position, result, model, progress),
        )
        last_commit = time.monotonic()
        rows = batcher.run(
            self._records(source, state.rows_done),
            state.rows_done,
            on_step=progress.tick,
            should_stop=lambda: self.stop_reason is not None,
            replayed=replayed,
        )
        for row in rows:
            writer.write([row.out])
            self._count(state.totals, row)
            if row.replayed:
                self._count(self.replayed, row)
                progress.finish(0, 0)  # finished by an earlier run: a row, but no token rate
            if not row.ok:
                errors.write(row.out)
                if self.config.fail_fast:
                    message = (row.out.get("error") or {}).get("message")
                    print(f"error: {message} (--fail-fast)", file=sys.stderr)
                    self.stop_reason = "fail-fast"
            state.rows_done += 1
            progress.update(1, row.prompt_tokens, row.output_tokens)
            if time.monotonic() - last_commit >= self.config.commit_s:
                self._commit(output, state, writer, errors)
                last_commit = time.monotonic()
            if self.stop_reason is not None:
                batcher.abort_all()
                break

    def _finished(
        self, position: int, result: RowResult, model: str, progress: Progress
    ) -> FinishedRow:
        """A row just finished (in any order): count it, format it, make it durable in the spill."""
        progress.finish(result.num_prompt_tokens, result.num_output_tokens)
        try:
            out = format_result(result, model)
        except Exception as e:  # noqa: BLE001 - one row's odd content must not end the job
            result = RowResult(
                result.row, error=f"cannot format the result ({e})", error_type="invalid_row"
            )
            out = writable(format_result(result, model))
        field = unencodable_field(out, "row")
        if field is not None:  # a backstop: the parser rejects such rows before the engine
            result = RowResult(
                result.row,
                error=f"{field} holds a lone surrogate and cannot be written",
                error_type="invalid_text",
            )
            out = writable(format_result(result, model))
        row = FinishedRow(
            position,
            out,
            result.ok,
            result.num_prompt_tokens if result.ok else 0,
            result.num_output_tokens if result.ok else 0,
            sum(1 for text in result.texts if not text) if result.ok else 0,
        )
        self.spill.add(row)
        return row

    def _finalize(self, output: Target, state: JournalState, writer) -> None:
        """Join the output (Parquet) and mark the journal finished; signals wait till the end."""

        def on_stage(writer_state: dict[str, Any]) -> None:
            state.output = writer_state
            output.save_journal(state)

        self.finalizing = True
        state.output = writer.finalize(on_stage)
        state.finished = True
        output.save_journal(state)

    def _records(self, source: InputSource, skip: int) -> Iterator[tuple[int, RawRecord]]:
        """(position within this shard, record) for the shard's rows not done yet."""
        shard = self.config.shard
        position = 0
        for record in source.records:
            if not shard.owns(record.index):
                continue
            if position >= skip:
                yield position, record
            position += 1

    # Resume ---------------------------------------------------------------------------------
    def _fingerprint(self, source: InputSource, output: Target) -> dict[str, Any]:
        cfg = self.config
        eng = cfg.engine
        return {
            "model": eng.model or "(default)",
            "dtype": eng.dtype,
            "max_model_len": eng.max_model_len,
            "engine_seed": eng.seed,
            "sampling": cfg.sampling.to_dict(),
            "input": cfg.input if source.path is None else str(source.path.resolve()),
            "input_bytes": source.num_bytes if source.path is None else _size(source.path),
            "split": cfg.split,
            "limit": cfg.limit,
            "shard": str(cfg.shard),
            "prompt_column": cfg.prompt_column,
            "as_chat": cfg.as_chat,
            "id_column": cfg.id_column,
            "keep_columns": list(cfg.keep_columns),
            "output_format": output.format(),
        }

    def _commit(self, output: Target, state: JournalState, writer, errors) -> None:
        state.output = writer.commit()
        state.errors_bytes = errors.commit()
        self.spill.commit()
        output.save_journal(state)
        self.spill.forget_below(state.rows_done)

    @staticmethod
    def _try(action: Callable[[], Any]) -> Any:
        """Run a clean-up step after a failure; its own failure must not hide the first one."""
        try:
            return action()
        except Exception as e:  # noqa: BLE001
            print(f"warning: {' '.join(str(e).split())}", file=sys.stderr)
            return None

    # Signals --------------------------------------------------------------------------------
    def _signals(self):
        job = self

        class _Handlers:
            def __enter__(self):
                self.old = {}
                for sig in (signal.SIGINT, signal.SIGTERM):
                    try:
                        self.old[sig] = signal.signal(sig, self.handle)
                    except ValueError:  # not the main thread
                        pass

            def handle(self, signum, frame):
                name = signal.Signals(signum).name
                if job.finalizing:  # every row is done: finish the output, then exit
                    print(f"\n{name}: finishing the output first", file=sys.stderr)
                    return
                if job.stop_reason is not None:  # second Ctrl-C: stop now
                    raise KeyboardInterrupt
                job.stop_reason = name
                print(
                    f"\n{job.stop_reason}: stopping after flushing finished rows; rerun the "
                    "same command to resume",
                    file=sys.stderr,
                )

            def __exit__(self, *exc):
                for sig, old in self.old.items():
                    signal.signal(sig, old)

        return _Handlers()

    # Report ---------------------------------------------------------------------------------
    def _report(self, output, llm, state, skipped, wall_s, stats0, totals0) -> dict[str, Any]:
        errors_file = output.errors_name if state.totals.rows_failed else None
        # this_run counts what this process computed: rows replayed from the spill are not.
        replayed = asdict(self.replayed)
        totals0 = {k: v + replayed[k] for k, v in totals0.items()}
        report = build_report(
            self.config,
            output.name,
            llm,
            state,
            skipped,
            wall_s,
            stats0,
            totals0,
            self.stop_reason,
            errors_file,
        )
        # Rows an earlier, killed run had finished: written from the spill, not recomputed.
        report["this_run"]["rows_replayed"] = self.replayed.rows_ok + self.replayed.rows_failed
        output.write_report(report)
        if not self.config.quiet:
            print_report(report)
        for warning in report_warnings(report):
            print(f"warning: {warning}", file=sys.stderr)
        return report

    def _already_done(self, output: Target, state: JournalState) -> int:
        output.remove_spill(state.fingerprint)  # left by a kill after the journal said finished
        print(
            f"{output.name} is already complete ({state.rows_done} rows); pass --overwrite to run "
            "again",
            file=sys.stderr,
        )
        return self._exit_code(state, output)

    def _exit_code(self, state: JournalState, output: Target) -> int:
        if self.stop_reason == "fail-fast":
            return exit_codes.FAIL_FAST
        if self.stop_reason is not None:
            return exit_codes.INTERRUPTED
        return exit_codes.ROW_ERRORS if state.totals.rows_failed else exit_codes.OK

    # Small helpers --------------------------------------------------------------------------
    def _shard_total(self, source: InputSource) -> int | None:
        if source.num_rows is None:
            return None
        s = self.config.shard
        return len(range(s.index, source.num_rows, s.count))

    def _use_rich(self) -> bool:
        if self.config.quiet:
            return False
        return (
            self.config.rich_progress
            if self.config.rich_progress is not None
            else sys.stdout.isatty()
        )

    @staticmethod
    def _count(totals, row: FinishedRow) -> None:
        if row.ok:
            totals.rows_ok += 1
            totals.prompt_tokens += row.prompt_tokens
            totals.output_tokens += row.output_tokens
            totals.empty_completions += row.num_empty
        else:
            totals.rows_failed += 1


def _generated_since(llm, stats0: dict[str, Any]):
    """A callable counting tokens the engine generated in this run (None without stats)."""
    if "num_generated_tokens" not in stats0:
        return None
    start = stats0["num_generated_tokens"]
    return lambda: llm.stats.num_generated_tokens - start


def _size(path: Path | None) -> int | None:
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _failure_line(e: BaseException, output: Target, rows_done: int) -> str:
    """One line naming what failed; the traceback only with TOKENMILL_TRACEBACK=1."""
    if os.environ.get("TOKENMILL_TRACEBACK"):
        traceback.print_exception(e)
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    what = "writing the output failed" if full or isinstance(e, OutputError) else "the job failed"
    return (
        f"error: {what} after {rows_done} rows ({cause}); the rows committed so far are saved, "
        f"and finished rows are kept in {output.spill_name}: fix the cause and rerun the "
        "same command to resume"
    )


__all__ = ["JobConfig", "run_job", "default_output", "errors_path", "CannotRun"]
