"""Hugging Face hub ids -> a checkpoint directory in huggingface_hub's own cache.

The cache layout is the library's (so `huggingface-cli download` and transformers share it):

    <cache>/models--org--name/refs/main             the commit hash that `main` points to
    <cache>/models--org--name/snapshots/<commit>/   config.json, tokenizer files, weights

Order: the cache first (no network at all when the snapshot is there, which is what
HF_HUB_OFFLINE=1 on an air-gapped cluster needs), then a download of `wanted_files` only.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from pathlib import Path

# What tokenmill reads from a checkpoint besides the weights.
META_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
)
SAFETENSORS_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def wanted_files(repo_files: list[str]) -> list[str]:
    """The files of a repo that tokenmill needs: metadata and tokenizer at the top level, and
    the safetensors weights, or the .bin weights only when the repo has no safetensors.

    Subfolders (onnx/, original/, gguf variants) are never fetched."""
    top = [f for f in repo_files if "/" not in f]
    weights = SAFETENSORS_PATTERNS if _matches(top, SAFETENSORS_PATTERNS) else BIN_PATTERNS
    return [f for f in top if _matches([f], META_PATTERNS + weights)]


def _matches(files: list[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(f, p) for f in files for p in patterns)


def has_weights(snapshot: Path) -> bool:
    return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin"))


def download_checkpoint(
    repo_id: str, revision: str | None = None, download_dir: str | None = None
) -> Path:
    """The snapshot directory of `repo_id` at `revision` (default: main), fetched if needed."""
    from huggingface_hub import constants

    revision = revision or "main"
    cached = cached_snapshot(repo_id, revision, download_dir)
    if cached is not None:
        return cached
    cache = download_dir or constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        raise FileNotFoundError(
            f"model {repo_id} (revision {revision}) is not in the Hugging Face cache at {cache} "
            "and HF_HUB_OFFLINE=1 forbids downloading it; fill the cache first (e.g. "
            f"`huggingface-cli download {repo_id}` on a machine with network, same HF_HOME), "
            "pass --download-dir to where it lies, or pass a local checkpoint directory"
        )
    return _download(repo_id, revision, download_dir, cache)


def cached_snapshot(repo_id: str, revision: str, download_dir: str | None) -> Path | None:
    """The cached snapshot with a config and weights, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=download_dir, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    if (path / "config.json").exists() and has_weights(path):
        return path
    return None  # e.g. only a tokenizer was cached by another tool


def _download(repo_id: str, revision: str, download_dir: str | None, cache: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        files = wanted_files(HfApi().list_repo_files(repo_id, revision=revision))
        if "config.json" not in files or not any(
            f.endswith((".safetensors", ".bin")) for f in files
        ):
            raise FileNotFoundError(
                f"hub repo {repo_id} (revision {revision}) has no config.json with safetensors "
                "or .bin weights at its top level; is it a transformers checkpoint? (for a "
                ".gguf repo, download the file and pass its path)"
            )
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=download_dir, allow_patterns=files
        )  # shows huggingface_hub's progress bar per file
    except GatedRepoError as e:
        raise PermissionError(
            f"hub repo {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} "
            "with your account, then log in (`huggingface-cli login` or HF_TOKEN=...)"
        ) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"hub repo {repo_id} has no revision {revision!r}; pass a branch, tag or commit "
            "that exists (--revision)"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private: log in with "
            "`huggingface-cli login` or HF_TOKEN=...); for a local checkpoint, check the path"
        ) from e
    except _unreachable_errors() as e:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ConnectionError(
            f"cannot reach the Hugging Face hub at {endpoint} to fetch {repo_id} ({e}), and it "
            f"is not in the cache at {cache}; check the network (or HF_ENDPOINT / proxy "
            "settings), or fill the cache on a machine with network and run with "
            "HF_HUB_OFFLINE=1"
        ) from e
    return Path(path)


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the hub cannot be reached: its own HTTP and cache-miss
    errors, and the transport errors of whichever httpx package it is built on."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    errors: list[type[BaseException]] = [
        HfHubHTTPError,
        LocalEntryNotFoundError,
        ConnectionError,
        TimeoutError,
    ]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
