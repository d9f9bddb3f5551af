"""llguidance vs xgrammar on the default model's tokenizer: compile time and mask time per token.

    PYTHONPATH=. python benchmarks/grammar_libs.py

For each constraint: the compile time (first compile, no cache) and the mean time to compute
one token mask + consume the token, walking the tokens of a valid output. One CPU thread.
Results go in docs/structured_output.md.
"""

from __future__ import annotations

import json
import time

from transformers import AutoTokenizer

from tokenmill.engine.model_source import resolve_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "status": {"enum": ["open", "shipped", "delivered", "cancelled"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
            },
        },
        "customer": {"$ref": "#/$defs/customer"},
    },
    "required": ["id", "status", "items", "customer"],
    "$defs": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
            "required": ["name"],
        }
    },
}
CASES = [
    (
        "json: person",
        "json",
        PERSON,
        json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"]}),
    ),
    (
        "json: order (nested, $ref)",
        "json",
        ORDER,
        json.dumps(
            {
                "id": "ABC-1234",
                "status": "shipped",
                "items": [
                    {"sku": "pen", "qty": 3, "price": 1.5},
                    {"sku": "ink", "qty": 1, "price": 12.0},
                ],
                "customer": {"name": "Grace Hopper", "vip": True},
            }
        ),
    ),
    ("any json", "json_object", None, json.dumps({"a": [1, 2, {"b": "c"}], "d": None})),
    ("regex: date", "regex", r"\d{4}-\d{2}-\d{2}", "2024-05-17"),
    ("choice: 4 labels", "choice", ["positive", "negative", "neutral", "mixed"], "neutral"),
]


def bench_llguidance(tok, vocab_size, kind, spec, text):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
    t_tok = time.perf_counter() - t0
    if kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec))
    elif kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec)
        )
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, grammar)
    matcher.compute_bitmask()  # the first mask finishes lazy construction
    t_compile = time.perf_counter() - t0
    matcher.reset()
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llt.allocate_token_bitmask(1, vocab_size)
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    t0 = time.perf_counter()
    for t in ids:
        llt.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(t), (t, matcher.get_error())
    t_mask = (time.perf_counter() - t0) / len(ids)
    return t_tok, t_compile, t_mask, len(ids)


def bench_xgrammar(tok, vocab_size, kind, spec, text):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "json":
        compiled = compiler.compile_json_schema(json.dumps(spec))
    elif kind == "json_object":
        compiled = compiler.compile_builtin_json_grammar()
    elif kind == "regex":
        compiled = compiler.compile_regex(spec)
    else:
        compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))
    t_compile = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    t0 = time.perf_counter()
    for t in ids:
        matcher.fill_next_token_bitmask(bitmask, 0)
        assert matcher.accept_token(t), t
    t_mask = (time.perf_counter() - t0) / len(ids)
    return t_tok, t_compile, t_mask, len(ids)


def main() -> None:
    model_dir, name = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = len(tok)
    print(f"model {name}, vocab {vocab_size}")
    print(
        f"{'constraint':28} {'lib':11} {'tokenizer s':>11} {'compile ms':>10} "
        f"{'mask us/tok':>11} {'tokens':>6}"
    )
    for label, kind, spec, text in CASES:
        for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            t_tok, t_compile, t_mask, n = fn(tok, vocab_size, kind, spec, text)
            print(
                f"{label:28} {lib:11} {t_tok:11.2f} {t_compile * 1e3:10.1f} "
                f"{t_mask * 1e6:11.1f} {n:6d}"
            )


if __name__ == "__main__":
    main()
