"""Where a job's output goes: a local file (LocalTarget) or a URL (store.StoreTarget).

Both answer the same questions for the job (job.py) and the resume decision (resume.py): check
the path before the model loads, lock it, load and save the journal, check the output against
it, open the writer, the errors file and the spill, write the report. A local output keeps its
own design (appends, fsync, rename, flock; writers.py); a store output is parts plus a manifest
(store.py), since object stores cannot append or rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.io.fs import StoreError, is_url, local_spec, url_fs
from tokenmill.io.journal import JournalState, journal_path, load_journal, save_journal
from tokenmill.io.lock import OutputLock
from tokenmill.io.preflight import PreflightError, check_output
from tokenmill.io.report import report_path, write_report
from tokenmill.io.resume import (
    check_output as check_journaled_output,
)
from tokenmill.io.resume import (
    errors_path,
    output_present,
    remove_file,
    remove_outputs,
)
from tokenmill.io.shard import Shard
from tokenmill.io.spill import Spill, spill_path
from tokenmill.io.writers import ErrorsFile, open_writer, output_format


def open_target(spec: str):
    """The output at `spec`: a StoreTarget for a store URL, else a LocalTarget (file:// too)."""
    if is_url(spec):
        from tokenmill.io.store import StoreTarget

        try:
            return StoreTarget(spec)
        except StoreError as e:
            raise PreflightError(str(e)) from e
    return LocalTarget(Path(local_spec(spec)))


def default_output(spec: str, shard: Shard) -> str:
    """INPUT-stem.results.jsonl beside the input (cwd for stdin and hub names)."""
    tag = "" if shard.is_whole else f".shard-{shard.index}-of-{shard.count}"
    if is_url(spec):  # s3://b/data/prompts.jsonl -> s3://b/data/prompts.results.jsonl
        head, _, name = spec.rstrip("/").rpartition("/")
        stem = name.rsplit(".", 1)[0] if "." in name and not spec.endswith("/") else name
        return f"{head}/{stem}{tag}.results.jsonl"
    spec = local_spec(spec)
    if spec == "-":
        base = Path("stdin")
    elif Path(spec).exists():
        p = Path(spec.rstrip("/"))
        base = p.parent / (p.stem if p.is_file() else p.name)
    else:
        base = Path(spec.replace("/", "__"))
    return f"{base}{tag}.results.jsonl"


class LocalTarget:
    """OUTPUT as a local file: appended, fsynced, flock'ed (writers.py, journal.py, lock.py)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        self.journal_name = str(journal_path(path))
        self.report_name = str(report_path(path))
        self.errors_name = str(errors_path(path))
        self.spill_name = spill_path(path).name

    def format(self) -> str:
        return output_format(self.path)

    def check(self, source) -> None:
        try:
            self.format()
        except ValueError as e:
            raise PreflightError(str(e)) from e
        if source.path is not None and self.path.resolve() == source.path.resolve():
            raise PreflightError(f"--output {self.path} is the input itself; choose another path")
        check_output(self.path)

    def lock(self, command_line: str) -> OutputLock:
        return OutputLock(self.path, command_line)

    def load_journal(self) -> JournalState | None:
        return load_journal(self.path)

    def save_journal(self, state: JournalState) -> None:
        save_journal(self.path, state)

    def has_output(self) -> bool:
        return output_present(self.path)

    def verify(self, state: JournalState) -> None:
        check_journaled_output(self.path, state)

    def remove_all(self, fingerprint: dict[str, Any]) -> None:
        remove_outputs(self.path)

    def spill(self, fingerprint: dict[str, Any]) -> Spill:
        return Spill(self.path)

    def remove_spill(self, fingerprint: dict[str, Any]) -> None:
        remove_file(spill_path(self.path))

    def open_writer(self, state: dict[str, Any]):
        return open_writer(self.path, state)

    def open_errors(self, errors_bytes: int, writer) -> ErrorsFile:
        return ErrorsFile(errors_path(self.path), errors_bytes)

    def write_report(self, report: dict[str, Any]) -> None:
        write_report(report_path(self.path), report)


def output_exists(spec: str) -> bool:
    """Whether a finished output file (local path or URL) is there."""
    if is_url(spec):
        fs, path = url_fs(spec)
        return fs.exists(path)
    return Path(local_spec(spec)).exists()
