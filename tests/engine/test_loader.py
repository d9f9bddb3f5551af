"""Loading checkpoints: unknown architectures, sharded safetensors, incomplete checkpoints,
non-checkpoint paths, and a tiny .gguf file written with the gguf package."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_utils import PROMPT_TEXTS, encode_all, greedy, hf_model, make_llm, token_ids
from safetensors.torch import load_file, save_file

from tokenmill import LLM


def test_unknown_architecture_names_the_supported_ones(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as e:
        LLM(str(model_dir), device="cpu")
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(e.value)


def test_sharded_checkpoint_loads(tiny_model_dir, tmp_path, hf_reference):
    model = hf_model(tiny_model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in tiny_model_dir.iterdir():
        if (
            f.name.startswith("tokenizer")
            or f.name.endswith(".jinja")
            or f.name == "special_tokens_map.json"
        ):
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    llm = make_llm(sharded)
    prompts = encode_all(llm, PROMPT_TEXTS[:4])
    outs = llm.generate(prompts, greedy(12), use_tqdm=False)
    assert token_ids(outs) == hf_reference(tiny_model_dir, prompts, 12)


def test_incomplete_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj"):
        make_llm(model_dir)


def test_wrong_shape_is_an_error(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "wrong-shape"
    shutil.copytree(tiny_model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        make_llm(model_dir)


def test_paths_that_are_not_models_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM("some-org/some-model-on-the-hub", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path / "empty"), device="cpu")
