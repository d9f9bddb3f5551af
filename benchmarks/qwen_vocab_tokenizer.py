"""A Hugging Face tokenizer with Qwen's own 151,643-token vocabulary, for grammar benchmarks.

    pip download --no-deps dashscope==2.0.2 -d /tmp/ds
    PYTHONPATH=. python3 benchmarks/qwen_vocab_tokenizer.py /tmp/ds/dashscope-2.0.2-*.whl OUT

Issue 10 measures a JSON-schema constraint on W2's model shape (qwen3-0.6b). With no model hub,
the tests' and benchmarks' tokenizers are SmolLM2's 49,152 tokens; a grammar's mask costs more
over a larger vocabulary, so this builds the real one: DashScope's wheel ships Qwen's BPE ranks
(`dashscope/resources/qwen.tiktoken`, the 151,643 byte-level tokens Qwen2 and Qwen3 share).
Converted by transformers' TikTokenConverter (the byte-level BPE vocabulary, the merges
recovered from the ranks, Qwen's split pattern), with <|endoftext|>, <|im_start|> and
<|im_end|> at 151,643-151,645 and a generation_config.json with EOS 151,645 beside it. Prompts
in the benchmarks are token ids, so only the vocabulary's strings matter to them; encoding text
round-trips as the check below shows.
"""

from __future__ import annotations

import base64
import json
import sys
import zipfile
from pathlib import Path

from transformers.convert_slow_tokenizer import TikTokenConverter

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def read_ranks(wheel: Path) -> dict[bytes, int]:
    """tiktoken's format: a base64 token and its rank per line (read here: tiktoken itself is
    not a dependency)."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read("dashscope/resources/qwen.tiktoken").decode()
    rows = (line.split() for line in text.splitlines() if line)
    return {base64.b64decode(tok): int(rank) for tok, rank in rows}


def main() -> None:
    wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    ranks = read_ranks(wheel)

    class Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _path: ranks)

    tok = Converter(pattern=PATTERN, extra_special_tokens=SPECIALS).converted()
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
    print(f"{tok.get_vocab_size()} tokens -> {out}; {text!r}: {ids}")


if __name__ == "__main__":
    main()
