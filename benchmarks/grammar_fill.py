"""Host cost of a constrained step's grammar work, by how it is spread over threads (issue 10).

    PYTHONPATH=. python3 benchmarks/grammar_fill.py TOKENIZER_DIR [--rows 700] [--steps 40]

Simulates `--rows` requests decoding under sample_data/person.schema.json in lockstep: each
step fills every live row's mask, draws one allowed token per row (uniformly among the
allowed: long strings, like a random-weight model at T 0.8), and advances the matchers. Every
variant runs on the same states each step (accepts are rolled back, the variant order rotates
step by step so no variant always runs first), and the table gives ms per step:

- fill xgr-N: xgrammar's BatchGrammarMatcher(max_threads=N) over all rows;
- fill pool-N: the rows cut into N chunks, one BatchGrammarMatcher(max_threads=1) per chunk
  on N threads (the engine's GrammarThreads);
- accept batch / loop / pool-N: BatchGrammarMatcher.batch_accept_token over all rows, one
  accept_token per row, or batch_accept_token per chunk on N threads.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("--rows", type=int, default=700)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", default="2,4,8")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(tok)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    schema = (ROOT / "sample_data/person.schema.json").read_text()
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(
        xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    )
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.rows)]
    bitmask = torch.empty((args.rows, (vocab + 31) // 32), dtype=torch.int32)
    pool = ThreadPoolExecutor(max(counts))
    per_thread = [xgr.BatchGrammarMatcher(max_threads=1) for _ in range(max(counts))]

    def chunks(n: int, k: int) -> list[tuple[int, int]]:
        return [(n * j // k, n * (j + 1) // k) for j in range(k)]

    def pooled(fn, n: int, k: int):
        parts = chunks(n, k)
        futs = [pool.submit(fn, j, lo, hi) for j, (lo, hi) in enumerate(parts[1:], 1)]
        out = [fn(0, *parts[0])]
        return out + [f.result() for f in futs]

    fills, accepts = {}, {}
    for n in (1, max(counts)):
        b = xgr.BatchGrammarMatcher(max_threads=n)
        fills[f"xgr-{n}"] = lambda ms, idx, b=b: b.batch_fill_next_token_bitmask(ms, bitmask, idx)
    for k in counts:

        def fill_pool(ms, idx, k=k):
            def part(j, lo, hi):
                per_thread[j].batch_fill_next_token_bitmask(ms[lo:hi], bitmask, idx[lo:hi])

            pooled(part, len(ms), k)

        fills[f"pool-{k}"] = fill_pool
    accepts["batch"] = lambda ms, toks: list(xgr.BatchGrammarMatcher.batch_accept_token(ms, toks))
    accepts["loop"] = lambda ms, toks: [m.accept_token(t) for m, t in zip(ms, toks)]
    for k in counts:

        def accept_pool(ms, toks, k=k):
            def part(j, lo, hi):
                return list(xgr.BatchGrammarMatcher.batch_accept_token(ms[lo:hi], toks[lo:hi]))

            return [ok for chunk in pooled(part, len(ms), k) for ok in chunk]

        accepts[f"pool-{k}"] = accept_pool

    spent = {("fill", k): 0.0 for k in fills} | {("accept", k): 0.0 for k in accepts}
    shifts = torch.arange(32, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    steps = rows_total = 0
    for step in range(args.steps):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        ms = [matchers[i] for i in live]
        names = list(fills)
        for name in names[step % len(names) :] + names[: step % len(names)]:
            t0 = time.perf_counter()
            fills[name](ms, live)
            spent["fill", name] += time.perf_counter() - t0
        bits = ((bitmask[live].unsqueeze(-1) >> shifts) & 1).view(len(live), -1)[:, :vocab]
        toks = torch.multinomial(bits.float(), 1, generator=gen).flatten().tolist()
        names = list(accepts)
        order = names[step % len(names) :] + names[: step % len(names)]
        for i, name in enumerate(order):
            t0 = time.perf_counter()
            ok = accepts[name](ms, toks)
            spent["accept", name] += time.perf_counter() - t0
            assert all(ok), "a token drawn from the mask was rejected"
            if i < len(order) - 1:
                for m in ms:
                    m.rollback(1)
        steps += 1
        rows_total += len(live)
    cpus = len(os.sched_getaffinity(0))
    print(f"{cpus} CPUs; vocab {vocab}; {steps} steps, mean {rows_total / steps:.0f} live rows")
    print("\n| work | variant | ms / step | us / row |\n|---|---|---|---|")
    for (work, name), s in spent.items():
        print(f"| {work} | {name} | {1e3 * s / steps:.2f} | {1e6 * s / rows_total:.1f} |")


if __name__ == "__main__":
    main()
