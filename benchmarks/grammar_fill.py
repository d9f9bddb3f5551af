"""Host cost of a constrained step's grammar work, by how it is spread over threads (issue 10).

    PYTHONPATH=. python3 benchmarks/grammar_fill.py TOKENIZER_DIR [--rows 700] [--steps 40]
        [--threads 2,4,8]

Simulates `--rows` requests decoding under sample_data/person.schema.json in lockstep: each
step fills every live row's mask, draws one allowed token per row (uniformly among the
allowed: long strings, like a random-weight model at T 0.8), and advances the matchers. Each
variant walks its own fresh matchers from the same seed, so all variants see the same states,
and every fill is the first fill of its state, as in the engine (filling a state a second time
is cheaper, and threads help that case more than the first). ms per step:

- fill xgr-N: xgrammar's BatchGrammarMatcher(max_threads=N) over all rows;
- fill pool-N: the rows cut into N chunks, one BatchGrammarMatcher(max_threads=1) per chunk on
  N threads (the engine's GrammarThreads);
- fill pool-N refill: the same, filling the states the pool-N fill just filled, again;
- accept batch / loop: BatchGrammarMatcher.batch_accept_token over all rows, or one
  accept_token per row (the engine's), each on its own walk.
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
    bitmask = torch.empty((args.rows, (vocab + 31) // 32), dtype=torch.int32)
    pool = ThreadPoolExecutor(max(counts))
    per_thread = [xgr.BatchGrammarMatcher(max_threads=1) for _ in range(max(counts))]

    def pooled_fill(k: int):
        def fill(ms, idx):
            n = len(ms)
            cuts = [n * j // k for j in range(k + 1)]

            def part(j):
                lo, hi = cuts[j], cuts[j + 1]
                per_thread[j].batch_fill_next_token_bitmask(ms[lo:hi], bitmask, idx[lo:hi])

            futures = [pool.submit(part, j) for j in range(1, k)]
            part(0)
            for f in futures:
                f.result()

        return fill

    def xgr_fill(n: int):
        b = xgr.BatchGrammarMatcher(max_threads=n)
        return lambda ms, idx: b.batch_fill_next_token_bitmask(ms, bitmask, idx)

    def accept_loop(ms, toks):
        return [m.accept_token(t) for m, t in zip(ms, toks)]

    def accept_batch(ms, toks):
        return list(xgr.BatchGrammarMatcher.batch_accept_token(ms, toks))

    shifts = torch.arange(32, dtype=torch.int32)

    def walk(fill, accept, refill=False) -> tuple[float, float, float, int, int]:
        """One lockstep walk: seconds filling (first fills), refilling, accepting; steps, rows."""
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.rows)]
        gen = torch.Generator().manual_seed(0)
        t_fill = t_refill = t_accept = 0.0
        steps = rows = 0
        for _ in range(args.steps):
            live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
            if not live:
                break
            ms = [matchers[i] for i in live]
            t0 = time.perf_counter()
            fill(ms, live)
            t_fill += time.perf_counter() - t0
            if refill:
                t0 = time.perf_counter()
                fill(ms, live)
                t_refill += time.perf_counter() - t0
            bits = ((bitmask[live].unsqueeze(-1) >> shifts) & 1).view(len(live), -1)[:, :vocab]
            toks = torch.multinomial(bits.float(), 1, generator=gen).flatten().tolist()
            t0 = time.perf_counter()
            ok = accept(ms, toks)
            t_accept += time.perf_counter() - t0
            assert all(ok), "a token drawn from the mask was rejected"
            steps += 1
            rows += len(live)
        return t_fill, t_refill, t_accept, steps, rows

    results = []  # (work, variant, seconds, steps, rows)
    for n in sorted({1, max(counts)}):
        f, _, _, steps, rows = walk(xgr_fill(n), accept_loop)
        results.append(("fill", f"xgr-{n}", f, steps, rows))
    for k in counts:
        f, r, _, steps, rows = walk(pooled_fill(k), accept_loop, refill=True)
        results.append(("fill", f"pool-{k}", f, steps, rows))
        results.append(("fill", f"pool-{k} refill", r, steps, rows))
    for name, accept in (("batch", accept_batch), ("loop", accept_loop)):
        _, _, a, steps, rows = walk(xgr_fill(1), accept)
        results.append(("accept", name, a, steps, rows))
    cpus = len(os.sched_getaffinity(0))
    steps, rows = results[0][3], results[0][4]
    print(f"{cpus} CPUs; vocab {vocab}; {steps} steps, mean {rows / steps:.0f} live rows")
    print("\n| work | variant | ms / step | us / row |\n|---|---|---|---|")
    for work, name, s, steps, rows in results:
        print(f"| {work} | {name} | {1e3 * s / steps:.2f} | {1e6 * s / rows:.1f} |")


if __name__ == "__main__":
    main()
