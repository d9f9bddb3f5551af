"""Checks that run before anything heavy loads (the model takes seconds to minutes).

Each failure is a PreflightError whose message is one line that says what to change; the job
turns it into exit code 3 (CANNOT_RUN) without a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PreflightError(Exception):
    """The job cannot start; the message says what to change."""


# Any one of these makes a tokenizer transformers can load (vocab.json needs merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def check_output(output: Path) -> None:
    """OUTPUT's folder exists or can be made, and a file can be created in it."""
    parent = output.parent
    blocker = _existing_ancestor(parent)
    if blocker is not None and not blocker.is_dir():
        raise PreflightError(
            f"cannot write {output}: {blocker} is a file, not a folder; choose another --output"
        )
    if output.is_dir():
        raise PreflightError(
            f"--output {output} is a folder; pass a file path such as {output / 'results.jsonl'}"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tokenmill-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(
            f"cannot write in {parent} ({e.strerror or e}); choose another --output"
        ) from None
    if output.exists() and not os.access(output, os.W_OK):
        raise PreflightError(f"{output} is read-only; make it writable or choose another --output")


def check_model_dir(model: str | None) -> None:
    """A local checkpoint folder has config.json, weights and tokenizer files.

    Anything else (the default model, a .gguf file, a hub id) is left to the loader.
    """
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        return
    missing = []
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors)")
    if not _has_tokenizer(path):
        missing.append(
            "tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)"
        )
    if missing:
        raise PreflightError(
            f"model folder {path} has no {', no '.join(missing)}; copy the missing files from the "
            "original checkpoint, or pass --model a complete checkpoint folder or a .gguf file"
        )


def check_rows(num_rows: int | None, description: str) -> None:
    """Stop before loading the model when the input (after --limit / --shard) has no rows."""
    if num_rows == 0:
        raise PreflightError(
            f"{description} has no rows; nothing to generate (check the file, --limit and --shard)"
        )


def _has_tokenizer(path: Path) -> bool:
    if (path / "vocab.json").exists():
        return (path / "merges.txt").exists() or (path / "tokenizer.json").exists()
    return any((path / name).exists() for name in TOKENIZER_FILES) or bool(
        next(path.glob("*.tiktoken"), None)
    )


def _existing_ancestor(path: Path) -> Path | None:
    """The nearest of path and its parents that exists (as anything)."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return None
