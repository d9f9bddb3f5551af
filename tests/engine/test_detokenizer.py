"""Incremental detokenization: the text built token by token equals tokenizer.decode of all the
output ids, for many random sequences including multi-byte characters; stop strings. Every
test runs twice: through the `tokenizers` DecodeStream (fast tokenizers) and through the
window decoding that other tokenizers use."""

from __future__ import annotations

import random

import pytest
from factories import make_tokenizer

from tokenmill import SamplingParams
from tokenmill.engine import detokenizer
from tokenmill.engine.detokenizer import IncrementalDetokenizer

# Pieces from the tokenizer's training text (multi-token merges) and characters it never saw
# (split into single byte tokens: 2, 3 and 4 bytes of UTF-8).
PIECES = [
    "The",
    " quick",
    " brown",
    " fox",
    " café",
    " naïve",
    " 東京",
    " jalapeño",
    "\n",
    "    return",
    " 0",
    " 1",
    "!",
    " ",
    "  ",
    "é",
    "ß",
    "€",
    "😀",
    "🦊",
    " 語",
    "ñ",
    "\t",
    "a",
    "Paris",
    " is",
    " the",
    " capital",
    ".",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True, params=["stream", "window"])
def decode_path(request, monkeypatch):
    if request.param == "window":
        monkeypatch.setattr(detokenizer, "_decode_stream", lambda *a: None)
    return request.param


def test_a_fast_tokenizer_decodes_through_decode_stream(tokenizer, decode_path):
    det = IncrementalDetokenizer(tokenizer, [5], SamplingParams())
    assert (det._stream is not None) == (decode_path == "stream")


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))


def _feed(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> None:
    i = 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        det.add(ids[i : i + n])
        i += n


def _random_run(tokenizer, rng: random.Random):
    """A random prompt and output, the output fed to a detokenizer in random pieces."""
    prompt = tokenizer(_random_text(rng), add_special_tokens=False).input_ids
    output = tokenizer(_random_text(rng), add_special_tokens=False).input_ids
    det = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    _feed(det, output, rng)
    return prompt, output, det


@pytest.mark.parametrize("seed", range(6))
def test_incremental_text_equals_decode_of_all_ids(tokenizer, seed):
    rng = random.Random(seed)
    for _ in range(50):
        prompt, output, det = _random_run(tokenizer, rng)
        expected = tokenizer.decode(output, skip_special_tokens=True)
        assert det.text == expected, (prompt, output)  # whole characters: nothing held back
        assert det.flush() is None
        assert det.visible_text(finished=True) == expected, (prompt, output)


def test_multibyte_character_split_over_tokens_is_never_shown_half(tokenizer):
    ids = tokenizer("🦊😀€", add_special_tokens=False).input_ids
    assert len(ids) > 3  # byte-level fallback: several tokens per character
    det = IncrementalDetokenizer(tokenizer, tokenizer("Hi").input_ids, SamplingParams())
    for t in ids:
        det.add([t])
        assert "\ufffd" not in det.text
    assert det.text == "🦊😀€"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer("Paris", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    skip = IncrementalDetokenizer(tokenizer, [5], SamplingParams())
    skip.add(ids)
    keep = IncrementalDetokenizer(tokenizer, [5], SamplingParams(skip_special_tokens=False))
    keep.add(ids)
    assert skip.text == "Paris" and keep.text == "Paris</s>"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_cuts_the_text(tokenizer, include):
    text = " The quick brown fox is the capital."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stop = "x is t"  # spans " fox", " is", " the"
    params = SamplingParams(stop=[stop, "zzz"], include_stop_str_in_output=include)
    det = IncrementalDetokenizer(tokenizer, [5], params)
    found = None
    for t in ids:
        found = det.add([t])
        if found:
            break
    assert found == stop and det.stopped
    cut = text.index(stop) + (len(stop) if include else 0)
    assert det.visible_text(finished=True) == text[:cut]
    assert det.add([ids[-1]]) is None  # nothing changes after the stop


def test_running_text_holds_back_a_possible_stop_prefix(tokenizer):
    params = SamplingParams(stop=["capital"])
    det = IncrementalDetokenizer(tokenizer, [5], params)
    det.add(tokenizer(" the capi", add_special_tokens=False).input_ids)
    shown = det.visible_text(finished=False)
    assert "capi" not in shown and det.text.startswith(shown)
    assert det.visible_text(finished=True) == det.text


def test_earliest_stop_string_wins(tokenizer):
    det = IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop=["fox", "quick"]))
    det.add(tokenizer("The quick brown fox", add_special_tokens=False).input_ids)
    assert det.text == "The " and det.stopped


@pytest.mark.parametrize("seed", range(4))
def test_random_token_ids_decode_like_the_whole_sequence(tokenizer, seed):
    """Arbitrary ids (byte tokens that form no valid UTF-8 included): once finished, the text
    is tokenizer.decode(output ids), also when the completion ends mid-character."""
    rng = random.Random(100 + seed)
    vocab = len(tokenizer)
    for _ in range(40):
        prompt = tokenizer(_random_text(rng), add_special_tokens=False).input_ids
        output = [rng.randrange(5, vocab) for _ in range(rng.randint(1, 20))]
        det = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        _feed(det, output, rng)
        det.flush()  # the completion ended: emit a held-back half character
        assert det.visible_text(finished=True) == tokenizer.decode(output), (prompt, output)


def test_completion_ending_mid_character_keeps_its_bytes(tokenizer):
    """Streaming and non-streaming must agree on the final text: LLM.generate (no stream)
    returns tokenizer.decode(ids), which shows a cut character as U+FFFD."""
    ids = tokenizer("ok 🦊", add_special_tokens=False).input_ids[:-1]  # drop the last byte
    assert tokenizer.decode(ids).endswith("\ufffd")
    det = IncrementalDetokenizer(tokenizer, [5], SamplingParams())
    det.add(ids)
    assert det.text == ""  # held back while it may still become a whole character
    assert det.flush() is None
    assert det.visible_text(finished=True) == tokenizer.decode(ids)


def test_flush_can_reveal_a_stop_string(tokenizer):
    ids = tokenizer("ok 🦊", add_special_tokens=False).input_ids[:-1]
    det = IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop=["ok"]))
    det.add(ids)
    assert det.flush() == "ok" and det.visible_text(finished=True) == ""


def _metaspace_tokenizer():
    """A Llama / Gemma-style tokenizer: "▁" for spaces, bytes as ordinary <0xNN> tokens for
    characters it never saw, and a decoder that strips the text's leading space."""
    import json

    from factories import SAMPLE_TEXT
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained.train_from_iterator(SAMPLE_TEXT * 4, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte tokens as the model's own vocabulary, as in Llama 2 / Gemma
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("seed", range(3))
def test_metaspace_byte_fallback_text_is_the_text_in_context(seed):
    """The prompt's last tokens set the first output token's leading space (the decoder strips
    the space only at the start of a text), and byte tokens join into whole characters."""
    tok = _metaspace_tokenizer()
    rng = random.Random(seed)
    for _ in range(30):
        prompt, output, det = _random_run(tok, rng)
        det.flush()
        whole, before = tok.decode(prompt + output), tok.decode(prompt)
        assert det.visible_text(finished=True) == whole[len(before) :], (prompt, output)


def test_a_prompt_tail_that_starts_mid_character_is_not_emitted(decode_path):
    """DecodeStream would emit a context whose text ends in U+FFFD with the first token; the
    context reaches back to the character's first byte instead."""
    tok = _metaspace_tokenizer()
    prompt = tok("🦊🦊", add_special_tokens=False).input_ids  # ▁ + 4 byte tokens, twice
    assert tok.convert_ids_to_tokens(prompt[-5:])[0] == "<0x8A>"  # the context's first byte
    assert tok.backend_tokenizer.decode(prompt[-5:]).endswith("\ufffd")  # bytes: one run
    det = IncrementalDetokenizer(tok, prompt, SamplingParams())
    assert (det._stream is not None) == (decode_path == "stream")
    output = tok("brown", add_special_tokens=False).input_ids
    det.add(output)
    assert det.text == " brown" == tok.decode(prompt + output)[len(tok.decode(prompt)) :]
