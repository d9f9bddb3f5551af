"""Vision-language checkpoints run their language model on text prompts (Gemma 3 4b-27b)."""

from __future__ import annotations

import pytest
from engine_utils import PROMPT_TEXTS, encode_all, greedy, hf_greedy, make_llm, token_ids
from factories import make_tiny_gemma3_vlm


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_tiny_gemma3_vlm(tmp_path_factory.mktemp("gemma3-vlm"))


def test_gemma3_vision_language_checkpoint_generates_text_like_transformers(vlm_dir):
    from transformers import Gemma3ForConditionalGeneration

    llm = make_llm(vlm_dir, block_size=4, max_num_batched_tokens=9)
    assert llm.model_info()["architecture"] == "Gemma3ForConditionalGeneration"
    prompts = encode_all(llm, PROMPT_TEXTS)
    outs = llm.generate(prompts, greedy(12), use_tqdm=False)
    hf = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir).float().eval()
    assert token_ids(outs) == hf_greedy(hf, prompts, 12)
