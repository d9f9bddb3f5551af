"""Deciding where a run starts: afresh, resuming a journal, or not at all.

no journal, no output            start afresh
journal, same fingerprint        resume at rows_done, after checking that the output (and
                                 the errors file) hold what the journal recorded
journal, output checks fail      refuse: exit 3, nothing written (never extend or zero-fill)
journal, other fingerprint       refuse, naming what changed
output, no journal               refuse: not ours to overwrite without --overwrite
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from tokenmill.io.journal import JournalState, fingerprint_diff, journal_path
from tokenmill.io.report import report_path
from tokenmill.io.spill import spill_path
from tokenmill.io.writers import JsonlWriter, OutputMismatch, writer_class


class ResumeRefused(Exception):
    """This run must not touch the output; the message says why and what to do."""


def errors_path(output: Path) -> Path:
    return (
        Path(str(output) + ".errors.jsonl")
        if output.suffix != ".jsonl"
        else output.with_suffix(".errors.jsonl")
    )


def parts_path(output: Path) -> Path:
    return Path(str(output) + ".parts")


def resume_state(target, fingerprint: dict[str, Any], overwrite: bool) -> JournalState:
    """The journal state this run starts from (raises ResumeRefused).

    `target` is the output (target.LocalTarget or store.StoreTarget): it loads the journal,
    checks the output against it and removes what --overwrite replaces.
    """
    if overwrite:
        target.remove_all(fingerprint)
        return JournalState(fingerprint)
    try:
        state = target.load_journal()
    except (ValueError, TypeError) as e:  # not JSON, or not our fields
        raise ResumeRefused(
            f"the journal {target.journal_name} is unreadable ({e}); pass --overwrite to start "
            "afresh or choose another --output"
        ) from e
    if state is None:
        if target.has_output():
            raise ResumeRefused(
                f"{target.name} exists and was not written by a resumable run; pass "
                "--overwrite to replace it or choose another --output"
            )
        target.remove_spill(fingerprint)  # left by a run whose journal is gone: nothing to resume
        return JournalState(fingerprint)
    changed = fingerprint_diff(state.fingerprint, fingerprint)
    if changed:
        raise ResumeRefused(
            f"{target.name} was started with a different {', '.join(changed)}; refusing to "
            "resume into it. Rerun with the original settings, pass --overwrite to start afresh, "
            "or choose another --output"
        )
    if not state.finished and state.rows_done and not target.has_output():
        print(f"warning: {target.name} is gone; starting from the first row", file=sys.stderr)
        return JournalState(fingerprint, runs=state.runs)
    try:
        target.verify(state)
    except OutputMismatch as e:
        done = "complete" if state.finished else f"{state.rows_done} rows done"
        raise ResumeRefused(
            f"{e}; the journal {target.journal_name} says {done}. Nothing was written: restore "
            "the file, or pass --overwrite to compute it afresh"
        ) from e
    if state.rows_done and not state.finished:
        print(f"resuming {target.name}: {state.rows_done} rows already done", file=sys.stderr)
    return state


def check_output(output: Path, state: JournalState) -> None:
    """Raise OutputMismatch unless a local output and errors file hold what the journal says."""
    writer_class(output).verify(output, state.output, finished=state.finished)
    if not state.finished:  # a resumed run appends to the errors file too
        JsonlWriter.verify(errors_path(output), {"bytes": state.errors_bytes}, finished=False)


def remove_outputs(output: Path) -> None:
    join_tmp = Path(str(output) + ".tmp")  # a Parquet join cut short
    for p in (output, journal_path(output), report_path(output), errors_path(output), join_tmp):
        remove_file(p)
    remove_file(spill_path(output))
    if parts_path(output).exists():
        shutil.rmtree(parts_path(output))


def output_present(output: Path) -> bool:
    return output.exists() or parts_path(output).exists()


def remove_file(path: Path) -> None:
    if path.exists():
        path.unlink()
