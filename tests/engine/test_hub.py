"""Hub ids (`org/name`) resolve through huggingface_hub's cache; nothing here touches the network.

The caches are built on disk in the library's own layout (blobs, snapshots of symlinks,
refs/<branch>), as `huggingface-cli download` leaves them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from engine_utils import PROMPT_TEXTS, greedy, make_llm, token_ids

from tokenmill import LLM
from tokenmill.engine.hub import wanted_files
from tokenmill.engine.model_source import is_hub_id

COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


def fill_hub_cache(
    cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str = "main", skip=()
) -> Path:
    """Put the files of checkpoint `src` into `cache` as huggingface_hub stores a snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_dir() or f.name in skip:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_loads_from_a_prefilled_cache_offline(tiny_model_dir, tmp_path, offline):
    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, "tiny-org/tiny-llama", tiny_model_dir)
    llm = make_llm("tiny-org/tiny-llama", download_dir=str(cache))
    assert llm.model_dir == snapshot
    assert llm.model_info()["model"] == "tiny-org/tiny-llama"
    outs = llm.generate(PROMPT_TEXTS[:3], greedy(8), use_tqdm=False)
    local = make_llm(tiny_model_dir).generate(PROMPT_TEXTS[:3], greedy(8), use_tqdm=False)
    assert token_ids(outs) == token_ids(local)


def test_revision_picks_its_snapshot(tiny_model_dir, tiny_model_factory, tmp_path, offline):
    cache = tmp_path / "hub"
    main = fill_hub_cache(cache, "org/m", tiny_model_dir)
    other = fill_hub_cache(cache, "org/m", tiny_model_factory("qwen3"), OTHER_COMMIT, "dev")
    assert make_llm("org/m", download_dir=str(cache)).model_dir == main
    assert make_llm("org/m", download_dir=str(cache), revision="dev").model_dir == other
    by_commit = make_llm("org/m", download_dir=str(cache), revision=OTHER_COMMIT)
    assert by_commit.hf_config.architectures == ["Qwen3ForCausalLM"]


def test_hf_home_and_hf_hub_offline_env_vars_work(tiny_model_dir, tmp_path):
    """The air-gapped cluster set-up, with the variables set before anything is imported."""
    fill_hub_cache(tmp_path / "home" / "hub", "tiny-org/tiny-llama", tiny_model_dir)
    code = (
        "from tokenmill import LLM\n"
        "llm = LLM('tiny-org/tiny-llama', device='cpu', dtype='float32')\n"
        "print(llm.model_dir)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"snapshots/{COMMIT}")


def test_offline_and_not_cached_says_how_to_fill_the_cache(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as e:
        LLM("tiny-org/absent", device="cpu", download_dir=str(tmp_path / "hub"))
    assert "huggingface-cli download tiny-org/absent" in str(e.value)


def test_a_snapshot_without_weights_is_not_taken_for_a_model(tiny_model_dir, tmp_path, offline):
    """Another tool may have cached only the config and tokenizer of a repo."""
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "org/m", tiny_model_dir, skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        LLM("org/m", device="cpu", download_dir=str(cache))


def _http_errors_module():
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    pytest.skip("no httpx package")


@pytest.fixture
def online(monkeypatch):
    """Online mode, with the one listing call replaced (no request may leave the machine)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fail(exc):
        def list_repo_files(self, repo_id, revision=None, **kw):
            calls.append((repo_id, revision))
            raise exc

        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        return calls

    return fail


def test_unreachable_hub_says_so(tmp_path, online):
    httpx = _http_errors_module()
    calls = online(httpx.ConnectError("Name or service not known"))
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face hub") as e:
        LLM("tiny-org/absent", device="cpu", download_dir=str(tmp_path / "hub"))
    assert "HF_HUB_OFFLINE=1" in str(e.value)
    assert calls == [("tiny-org/absent", "main")]


def test_gated_repo_says_how_to_get_access(tmp_path, online):
    httpx = _http_errors_module()
    from huggingface_hub.errors import GatedRepoError

    request = httpx.Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-3.1-8B")
    online(GatedRepoError("403 gated", response=httpx.Response(403, request=request)))
    with pytest.raises(PermissionError, match="gated") as e:
        LLM("meta-llama/Llama-3.1-8B", device="cpu", download_dir=str(tmp_path / "hub"))
    assert "huggingface.co/meta-llama/Llama-3.1-8B" in str(e.value) and "login" in str(e.value)


def test_download_fetches_only_what_tokenmill_reads():
    repo = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "flax_model.msgpack",
        "tf_model.h5",
        "onnx/model.onnx",
        "original/consolidated.00.pth",
        "README.md",
        ".gitattributes",
    ]
    assert sorted(wanted_files(repo)) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    old = ["config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "tf_model.h5"]
    assert sorted(wanted_files(old)) == [
        "config.json",
        "merges.txt",
        "pytorch_model.bin",
        "vocab.json",
    ]


def test_what_counts_as_a_hub_id():
    assert is_hub_id("facebook/opt-125m") and is_hub_id("Qwen/Qwen3-8B") and is_hub_id("gpt2")
    assert not is_hub_id("./models/x") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c") and not is_hub_id("model.gguf")


def test_bin_checkpoint_loads(tiny_model_dir, tmp_path, hf_reference):
    """Repos with only pytorch_model.bin (OPT's own, for one) load too."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, model_dir)
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    llm = make_llm(model_dir)
    prompts = [llm.encode(t) for t in PROMPT_TEXTS[:3]]
    outs = llm.generate(prompts, greedy(8), use_tqdm=False)
    assert token_ids(outs) == hf_reference(tiny_model_dir, prompts, 8)


def test_generate_command_takes_a_hub_id_and_revision(tiny_model_dir, tmp_path, offline):
    """`tokenmill generate --model org/name --revision R --download-dir D`, end to end."""
    import json

    from typer.testing import CliRunner

    from tokenmill.cli.app import app

    cache = tmp_path / "hub"
    fill_hub_cache(cache, "tiny-org/tiny-llama", tiny_model_dir, OTHER_COMMIT, "v1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in PROMPT_TEXTS[:3]))
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(prompts), "-o", str(out), "--model", "tiny-org/tiny-llama"]
    argv += ["--revision", "v1", "--download-dir", str(cache), "--device", "cpu"]
    argv += ["--temperature", "0", "--max-tokens", "4", "--quiet"]
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["error"] is None and r["output_tokens"] == 4 for r in rows)


def test_a_cache_miss_downloads_only_the_needed_files(tiny_model_dir, tmp_path, monkeypatch):
    """Online and not cached: the listing picks the files, snapshot_download fetches just those
    (faked here: it fills the cache as the real one would)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    repo_files = [f.name for f in tiny_model_dir.iterdir()] + ["pytorch_model.bin", "onnx/m.onnx"]
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: repo_files
    )
    calls = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        skip = [f.name for f in tiny_model_dir.iterdir() if f.name not in kw["allow_patterns"]]
        return str(fill_hub_cache(Path(cache_dir), repo_id, tiny_model_dir, skip=skip))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    llm = make_llm("tiny-org/tiny-llama", download_dir=str(cache))
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    wanted = set(calls[1]["allow_patterns"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= wanted
    assert not {"pytorch_model.bin", "onnx/m.onnx", "tokenmill_test_arch.json"} & wanted
    assert llm.model_dir == cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
