"""`tokenmill generate` as a library call: JobConfig in, exit code out.

    run_job(config, make_llm) ── open input ── check / resume journal ── load engine
                              └─ Batcher (window loop) ── writer + journal commits ── report

Durability: results are appended in input order; every `commit_s` seconds (and at the end, and
when stopping) the writers fsync and then the journal records how many rows are done. A restart
with the same fingerprint cuts the output back to the journal and skips the rows it lists, so
the finished output holds every input row exactly once whatever killed the earlier run.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io import exit_codes
from tokenmill.io.batcher import Batcher
from tokenmill.io.format import format_result
from tokenmill.io.journal import (
    JournalState,
    fingerprint_diff,
    journal_path,
    load_journal,
    save_journal,
)
from tokenmill.io.parse import RowParser
from tokenmill.io.preflight import PreflightError, check_model_dir, check_output, check_rows
from tokenmill.io.progress import Progress
from tokenmill.io.readers import InputError, InputSource, open_input
from tokenmill.io.report import (
    build_report,
    print_report,
    report_path,
    report_warnings,
    stats_snapshot,
    write_report,
)
from tokenmill.io.rows import RawRecord, RowResult
from tokenmill.io.shard import Shard
from tokenmill.io.writers import ErrorsFile, open_writer, output_format

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


class CannotRun(Exception):
    """The job cannot start (exit code CANNOT_RUN); the message says what to do."""


def default_output(spec: str, shard: Shard) -> Path:
    """INPUT-stem.results.jsonl beside the input (cwd for stdin and hub names)."""
    if spec == "-":
        base = Path("stdin")
    elif Path(spec).exists():
        p = Path(spec.rstrip("/"))
        base = p.parent / (p.stem if p.is_file() else p.name)
    else:
        base = Path(spec.replace("/", "__"))
    tag = "" if shard.is_whole else f".shard-{shard.index}-of-{shard.count}"
    return Path(f"{base}{tag}.results.jsonl")


def errors_path(output: Path) -> Path:
    return (
        Path(str(output) + ".errors.jsonl")
        if output.suffix != ".jsonl"
        else output.with_suffix(".errors.jsonl")
    )


def run_job(config: JobConfig, make_llm: Callable[[EngineConfig], Any] | None = None) -> int:
    """Run the job; returns an exit code from tokenmill.io.exit_codes."""
    try:
        return _Job(config, make_llm or _default_llm).run()
    except (CannotRun, InputError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CANNOT_RUN


def _default_llm(engine_config: EngineConfig):
    from tokenmill import LLM

    return LLM.from_config(engine_config)


class _Job:
    def __init__(self, config: JobConfig, make_llm):
        self.config = config
        self.make_llm = make_llm
        self.stop_reason: str | None = None

    # The run, top to bottom ------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        source = open_input(cfg.input, split=cfg.split, limit=cfg.limit)
        output = Path(cfg.output) if cfg.output else default_output(cfg.input, cfg.shard)
        self._check_output_path(output, source)
        check_rows(self._shard_total(source), source.description)
        check_model_dir(cfg.engine.model)
        state = self._resume_state(output, self._fingerprint(source, output))
        if state.finished:
            return self._already_done(output, state)
        try:
            llm = self.make_llm(cfg.engine)
        except Exception as e:  # noqa: BLE001 - any load failure means "could not run"
            raise CannotRun(
                f"could not load the model {cfg.engine.model or '(default)'}: {e}"
            ) from e
        state.runs += 1
        save_journal(output, state)  # before the output exists: a crash from here on resumes
        writer = open_writer(output, state.output)
        errors = ErrorsFile(errors_path(output), state.errors_bytes)
        t0, skipped = time.monotonic(), state.rows_done
        stats0 = stats_snapshot(llm)
        totals0 = asdict(state.totals)
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
                self._loop(llm, source, state, writer, errors, output, progress)
            except Exception as e:  # noqa: BLE001 - keep what is done, then report "could not run"
                traceback.print_exc()
                self._commit(output, state, writer, errors)
                raise CannotRun(
                    f"the job failed after {state.rows_done} rows ({type(e).__name__}: {e}); "
                    "what was done is saved: rerun the same command to resume"
                ) from e
        if self.stop_reason is None:
            writer.finalize()
            state.finished = True
        self._commit(output, state, writer, errors)
        writer.close()
        errors.close(remove_if_empty=state.finished)
        report = self._report(output, llm, state, skipped, time.monotonic() - t0, stats0, totals0)
        return self._exit_code(state, output) if report else exit_codes.CANNOT_RUN

    def _loop(
        self,
        llm,
        source: InputSource,
        state: JournalState,
        writer,
        errors,
        output: Path,
        progress: Progress,
    ) -> None:
        parser = RowParser(
            self.config.sampling,
            self.config.prompt_column,
            self.config.id_column,
            self.config.keep_columns,
            as_chat=_as_chat(self.config.as_chat, llm),
        )
        batcher = Batcher(llm, parser, self.config.window_rows, sort=self.config.sort)
        model = llm.model_info().get("model", str(self.config.engine.model))
        last_commit = time.monotonic()
        results = batcher.run(
            self._records(source, state.rows_done),
            state.rows_done,
            on_step=progress.tick,
            should_stop=lambda: self.stop_reason is not None,
            on_finish=lambda r: progress.finish(r.num_prompt_tokens, r.num_output_tokens),
        )
        for result in results:
            out = format_result(result, model)
            writer.write([out])
            self._count(state.totals, result)
            if not result.ok:
                errors.write(out)
                if self.config.fail_fast:
                    print(f"error: {result.error} (--fail-fast)", file=sys.stderr)
                    self.stop_reason = "fail-fast"
            state.rows_done += 1
            progress.update(1, result.num_prompt_tokens, result.num_output_tokens)
            if time.monotonic() - last_commit >= self.config.commit_s:
                self._commit(output, state, writer, errors)
                last_commit = time.monotonic()
            if self.stop_reason is not None:
                batcher.abort_all()
                break

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
    def _fingerprint(self, source: InputSource, output: Path) -> dict[str, Any]:
        cfg = self.config
        eng = cfg.engine
        return {
            "model": eng.model or "(default)",
            "dtype": eng.dtype,
            "max_model_len": eng.max_model_len,
            "engine_seed": eng.seed,
            "sampling": cfg.sampling.to_dict(),
            "input": cfg.input if source.path is None else str(source.path.resolve()),
            "input_bytes": _size(source.path),
            "split": cfg.split,
            "limit": cfg.limit,
            "shard": str(cfg.shard),
            "prompt_column": cfg.prompt_column,
            "as_chat": cfg.as_chat,
            "id_column": cfg.id_column,
            "keep_columns": list(cfg.keep_columns),
            "output_format": output_format(output),
        }

    def _resume_state(self, output: Path, fingerprint: dict[str, Any]) -> JournalState:
        if self.config.overwrite:
            _remove_outputs(output)
            return JournalState(fingerprint)
        state = load_journal(output)
        if state is None:
            if output.exists() or Path(str(output) + ".parts").exists():
                raise CannotRun(
                    f"{output} exists and was not written by a resumable run; pass "
                    "--overwrite to replace it or choose another --output"
                )
            return JournalState(fingerprint)
        changed = fingerprint_diff(state.fingerprint, fingerprint)
        if changed:
            raise CannotRun(
                f"{output} was started with a different {', '.join(changed)}; refusing to resume "
                "into it. Rerun with the original settings, pass --overwrite to start afresh, or "
                "choose another --output"
            )
        if not state.finished and state.rows_done and not _output_present(output):
            print(f"warning: {output} is gone; starting from the first row", file=sys.stderr)
            return JournalState(fingerprint, runs=state.runs)
        if state.rows_done:
            print(f"resuming {output}: {state.rows_done} rows already done", file=sys.stderr)
        return state

    def _commit(self, output: Path, state: JournalState, writer, errors) -> None:
        state.output = writer.commit()
        state.errors_bytes = errors.commit()
        save_journal(output, state)

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
                if job.stop_reason is not None:  # second Ctrl-C: stop now
                    raise KeyboardInterrupt
                job.stop_reason = signal.Signals(signum).name
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
        errors_file = str(errors_path(output)) if state.totals.rows_failed else None
        report = build_report(
            self.config,
            output,
            llm,
            state,
            skipped,
            wall_s,
            stats0,
            totals0,
            self.stop_reason,
            errors_file,
        )
        write_report(report_path(output), report)
        if not self.config.quiet:
            print_report(report)
        for warning in report_warnings(report):
            print(f"warning: {warning}", file=sys.stderr)
        return report

    def _already_done(self, output: Path, state: JournalState) -> int:
        print(
            f"{output} is already complete ({state.rows_done} rows); pass --overwrite to run again",
            file=sys.stderr,
        )
        return self._exit_code(state, output)

    def _exit_code(self, state: JournalState, output: Path) -> int:
        if self.stop_reason == "fail-fast":
            return exit_codes.FAIL_FAST
        if self.stop_reason is not None:
            return exit_codes.INTERRUPTED
        return exit_codes.ROW_ERRORS if state.totals.rows_failed else exit_codes.OK

    # Small helpers --------------------------------------------------------------------------
    def _check_output_path(self, output: Path, source: InputSource) -> None:
        try:
            output_format(output)
        except ValueError as e:
            raise CannotRun(str(e)) from e
        if source.path is not None and output.resolve() == source.path.resolve():
            raise CannotRun(f"--output {output} is the input itself; choose another path")
        check_output(output)

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
    def _count(totals, result: RowResult) -> None:
        if result.ok:
            totals.rows_ok += 1
            totals.prompt_tokens += result.num_prompt_tokens
            totals.output_tokens += result.num_output_tokens
            totals.empty_completions += sum(1 for text in result.texts if not text)
        else:
            totals.rows_failed += 1


def _as_chat(as_chat: bool | None, llm) -> bool:
    """--chat / --no-chat, or by default: whether the model has a chat template."""
    if as_chat is not None:
        return as_chat
    return bool(getattr(getattr(llm, "tokenizer", None), "chat_template", None))


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


def _output_present(output: Path) -> bool:
    return output.exists() or Path(str(output) + ".parts").exists()


def _remove_outputs(output: Path) -> None:
    import shutil

    for p in (output, journal_path(output), report_path(output), errors_path(output)):
        if p.exists():
            p.unlink()
    parts = Path(str(output) + ".parts")
    if parts.exists():
        shutil.rmtree(parts)


__all__ = ["JobConfig", "run_job", "default_output", "errors_path", "CannotRun"]
