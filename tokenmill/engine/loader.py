"""Weights from a Hugging Face checkpoint directory into a tokenmill model.

Reads every `*.safetensors` file (the index file of a sharded checkpoint names them; old
`pytorch_model*.bin` checkpoints when there are none), maps
checkpoint names onto ours (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and casts to the run
dtype. Tied embeddings need no lm_head tensor; an untied model without one is an error.
Under tensor parallelism each tensor is sharded as it is read: a sharded parameter's
`weight_loader` (models/linear.py) copies only this rank's part of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tokenmill.engine.models.linear import load_param


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files: safetensors (sharded or not), else pytorch_model*.bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / n for n in names]
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"no *.safetensors (or pytorch_model*.bin) weights in {model_dir}; tokenmill loads "
        "transformers checkpoints and .gguf files"
    )


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight, one file at a time."""
    for path in checkpoint_files(model_dir):
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy a checkpoint into `model`. A model may rename checkpoint tensors with
    `checkpoint_name(name) -> our name | None` (None: not needed) and split or transform one
    with `load_special(name, tensor, params) -> bool` (True: loaded)."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed", {})
    rename = getattr(model, "checkpoint_name", lambda name: name)
    loaded: set[str] = set()
    for ckpt_name, tensor in iter_checkpoint(model_dir):
        if "rotary_emb.inv_freq" in ckpt_name:
            continue
        name = rename(ckpt_name)
        if name is None:
            continue
        if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
            continue  # tied: the embedding serves as the head
        special = getattr(model, "load_special", None)
        if special is not None and special(name, tensor, params, loaded):
            continue
        _load_one(model, params, packed, name, tensor, loaded)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(
            f"checkpoint {model_dir} lacks {len(missing)} weight(s), e.g. {missing[:3]}; is it "
            "complete, and does config.json match it?"
        )


def _load_one(model, params, packed, name, tensor, loaded) -> None:
    for ckpt_name, (ours, shard) in packed.items():
        if f".{ckpt_name}." in name:
            target = name.replace(f".{ckpt_name}.", f".{ours}.")
            module = model.get_submodule(target.rsplit(".", 1)[0])
            with torch.no_grad():
                module.load_shard(params[target], shard, tensor)
            # a merged parameter is complete once all its shards arrived; count each arrival
            loaded.add(target + "#" + shard)
            if all(target + "#" + s in loaded for s in module.shard_offsets):
                loaded.add(target)
            return
    if name not in params:
        raise ValueError(f"checkpoint weight {name} has no place in {type(model).__name__}")
    load_param(params[name], tensor, name)
    loaded.add(name)
