"""Loading checkpoints: unknown architectures, sharded safetensors, incomplete checkpoints,
non-checkpoint paths, and a tiny .gguf file written with the gguf package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
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
    from tokenmill.engine.models.registry import FAMILIES, MODELS

    assert set(FAMILIES) == set(MODELS)
    for name in MODELS:
        assert name in str(e.value)
    assert 'set "architectures" to its base family\'s class' in str(e.value)  # what to do


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
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        LLM(str(tmp_path / "no" / "such" / "dir"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path / "empty"), device="cpu")


# ---- GGUF ----------------------------------------------------------------------------------------
def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary (convert_hf_to_gguf.py); transformers undoes it."""
    n = n_head_kv if n_head != n_head_kv else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 GGUF of a tiny Llama checkpoint, with its BPE tokenizer (gguf.GGUFWriter)."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    tokens = [""] * cfg["vocab_size"]
    for t, i in {**tok["model"]["vocab"], **added}.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in load_file(model_dir / "model.safetensors").items():
        a = t.float().numpy()
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            parts = name.split(".")  # model.layers.<i>.<module...>.weight
            key = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[key]}.weight"
            if key == "self_attn.q_proj":
                a = _permute(a, nh, nh)
            elif key == "self_attn.k_proj":
                a = _permute(a, nh, nkv)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_file_loads_and_matches_its_source(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    gguf_path = write_llama_gguf(tiny_model_dir, tmp_path / "tiny-llama.gguf")
    from_gguf = make_llm(gguf_path)
    assert from_gguf.model_dir.is_relative_to(tmp_path / "cache")
    assert from_gguf.model_info()["model"] == "tiny-llama.gguf"
    source = make_llm(tiny_model_dir)
    prompts = PROMPT_TEXTS[:5]
    assert encode_all(from_gguf, prompts) == encode_all(source, prompts)
    outs = from_gguf.generate(prompts, greedy(12), use_tqdm=False)
    assert token_ids(outs) == token_ids(source.generate(prompts, greedy(12), use_tqdm=False))
    # the second start reuses the converted checkpoint
    weights = from_gguf.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = make_llm(gguf_path)
    assert again.model_dir == from_gguf.model_dir and weights.stat().st_mtime_ns == mtime


def test_gguf_special_tokens_come_from_the_file(tiny_model_dir, tmp_path, monkeypatch):
    """The converted tokenizer, config and generation_config name the GGUF's own EOS, even when
    transformers' tokenizer conversion gets it wrong (5.17 gave the default model an EOS of
    <|im_start|>; every completion on such a machine ran past its end)."""
    import transformers

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    gguf_path = write_llama_gguf(tiny_model_dir, tmp_path / "tiny-llama.gguf")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    real = transformers.AutoTokenizer.from_pretrained

    def wrong_eos(*args, **kwargs):
        tok = real(*args, **kwargs)
        if kwargs.get("gguf_file"):
            tok.eos_token = tok.convert_ids_to_tokens(cfg["bos_token_id"])  # the 5.17 mistake
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrong_eos)
    llm = make_llm(gguf_path)
    gen = json.loads((llm.model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"]
    assert llm.tokenizer.eos_token_id == cfg["eos_token_id"]
    assert llm.eos_token_ids == frozenset({cfg["eos_token_id"]})


def test_gguf_conversions_of_an_older_format_are_redone(tiny_model_dir, tmp_path, monkeypatch):
    """A conversion cached by an older tokenmill (no generation_config.json, maybe a wrong EOS)
    is not reused: the cache key carries the conversion's version."""
    from tokenmill.engine import model_source

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    gguf_path = write_llama_gguf(tiny_model_dir, tmp_path / "tiny-llama.gguf")
    monkeypatch.setattr(model_source, "CONVERSION_VERSION", 1)
    old = model_source.gguf_to_checkpoint(gguf_path)
    monkeypatch.setattr(model_source, "CONVERSION_VERSION", 2)
    new = model_source.gguf_to_checkpoint(gguf_path)
    assert old != new and (new / "generation_config.json").exists()
    assert not old.exists()  # the older conversion of the same file is removed, not kept forever


def test_gguf_conversion_is_shared_by_copies_and_redone_for_new_content(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The cache is keyed by the file's content: the same GGUF at another path (a new virtualenv,
    a fresh clone, another mtime) reuses the conversion instead of adding another copy of the
    weights (each CI clone once added 540 MB for the default model and filled the disk), and a
    file whose bytes change at the same path is converted again."""
    import os
    import shutil

    from tokenmill.engine import model_source

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    first = write_llama_gguf(tiny_model_dir, tmp_path / "a" / "tiny-llama.gguf")
    converted = model_source.gguf_to_checkpoint(first)
    weights_mtime = (converted / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "b" / "tiny-llama.gguf"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1, 1))
    assert model_source.gguf_to_checkpoint(copy) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == weights_mtime
    conversions = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name != "digests"]
    assert conversions == [converted]

    with open(copy, "ab") as f:  # new bytes at the same path: a different file
        f.write(b"\0" * 32)
    assert model_source.gguf_to_checkpoint(copy) != converted
