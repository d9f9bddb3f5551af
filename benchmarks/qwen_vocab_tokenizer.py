"""A Hugging Face tokenizer with Qwen's own 151,643-token vocabulary, for grammar benchmarks.

    pip download --no-deps dashscope==2.0.2 -d /tmp/ds
    PYTHONPATH=. python3 benchmarks/qwen_vocab_tokenizer.py /tmp/ds/dashscope-2.0.2-*.whl OUT

Issue 10 measures a JSON-schema constraint on W2's model shape (qwen3-0.6b). With no model hub,
the tests' and benchmarks' tokenizers are SmolLM2's 49,152 tokens; a grammar's mask costs more
over a larger vocabulary, so this builds the real one: DashScope's wheel ships Qwen's BPE ranks
(`dashscope/resources/qwen.tiktoken`, the 151,643 byte-level tokens Qwen2 and Qwen3 share).
Written as a byte-level BPE (`tokenizers`): every rank's bytes as a token (GPT-2's byte-to-
unicode map), merges recovered from the ranks (each token of two or more bytes is the merge of
the split whose halves have the lowest ranks), Qwen's split pattern, and <|endoftext|>,
<|im_start|>, <|im_end|> at 151,643-151,645; a generation_config.json with EOS 151,645 beside
it. Prompts in the benchmarks are token ids, so only the vocabulary's strings matter to them;
encoding text round-trips as the check below shows.
"""

from __future__ import annotations

import base64
import json
import sys
import zipfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    keep += list(range(0xAE, 0xFF + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def read_ranks(wheel: Path) -> dict[bytes, int]:
    with zipfile.ZipFile(wheel) as z:
        text = z.read("dashscope/resources/qwen.tiktoken").decode()
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Each multi-byte token as the merge of its lowest-ranked split, in the token's rank order."""
    out = []
    for tok in sorted(ranks, key=ranks.__getitem__):
        if len(tok) < 2:
            continue
        splits = [
            (max(ranks[tok[:i]], ranks[tok[i:]]), tok[:i], tok[i:])
            for i in range(1, len(tok))
            if tok[:i] in ranks and tok[i:] in ranks
        ]
        if splits:
            out.append(min(splits)[1:])
    return out


def main() -> None:
    wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    ranks = read_ranks(wheel)
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    merges = [(enc(a), enc(b)) for a, b in merges_of(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert [tok.token_to_id(s) for s in SPECIALS] == [151643, 151644, 151645]
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 40960,
            },
            indent=1,
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    text = 'Hello, world! {"name": "Ada", "age": 36}\n  1234 中文'
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text, (text, tok.decode(ids))
    print(f"{tok.get_vocab_size()} tokens, {len(merges)} merges -> {out}; {text!r}: {ids}")


if __name__ == "__main__":
    main()
