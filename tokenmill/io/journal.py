"""The resume journal: OUTPUT.resume.json, rewritten atomically after each durable commit.

It records how far the job got (rows done of this shard, the writers' committed state, running
totals) and a fingerprint of everything that changes the results (model, sampling, input, shard,
columns). A restart resumes only when the fingerprint matches; `--overwrite` starts afresh.

Invariant: the journal is written only after the output it describes is on disk (fsync), so the
output is never shorter than the journal says; a restart cuts off anything written after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.io.writers import fsync_dir


@dataclass
class Totals:
    """Running totals over everything in the output, across resumed runs."""

    rows_ok: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    empty_completions: int = 0  # ok rows' completions with no text (EOS first)


@dataclass
class JournalState:
    fingerprint: dict[str, Any]
    rows_done: int = 0
    output: dict[str, Any] = field(default_factory=dict)
    errors_bytes: int = 0
    totals: Totals = field(default_factory=Totals)
    finished: bool = False
    runs: int = 0


def journal_path(output: Path) -> Path:
    return Path(str(output) + ".resume.json")


def load_journal(output: Path) -> JournalState | None:
    path = journal_path(output)
    if not path.exists():
        return None
    return journal_from_json(path.read_text())


def save_journal(output: Path, state: JournalState) -> None:
    path = journal_path(output)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(journal_to_json(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def journal_to_json(state: JournalState) -> str:
    return json.dumps(asdict(state), indent=1, sort_keys=True)


def journal_from_json(text: str | bytes) -> JournalState:
    """Raises ValueError / TypeError for text that is not a journal."""
    data = json.loads(text)
    data["totals"] = Totals(**data.get("totals", {}))
    return JournalState(**data)


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the fingerprint entries that differ (what a refused resume reports)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
