"""Weights from a Hugging Face checkpoint directory into a tokenmill model.

Reads every `*.safetensors` file (the index file of a sharded checkpoint names them), maps
checkpoint names onto ours (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and casts to the run
dtype. Tied embeddings need no lm_head tensor; an untied model without one is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}; tokenmill loads safetensors checkpoints "
            "and .gguf files (convert .bin checkpoints with transformers' save_pretrained)"
        )
    return files


def load_weights(model: nn.Module, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed", {})
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name:
                    continue
                if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
                    continue  # tied: the embedding serves as the head
                _load_one(model, params, packed, name, f.get_tensor(name), loaded)
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
    p = params[name]
    if p.shape != tensor.shape:
        raise ValueError(
            f"weight {name} has shape {tuple(tensor.shape)}, model expects {tuple(p.shape)}"
        )
    with torch.no_grad():
        p.copy_(tensor)
    loaded.add(name)
