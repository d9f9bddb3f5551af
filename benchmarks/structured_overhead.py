"""Host cost of constrained decoding per engine step, split into its parts, with the default
model's tokenizer and the real xgrammar (no model run).

    PYTHONPATH=. python benchmarks/structured_overhead.py [--rows 512] [--steps 40] [--threads 1 2]

Every row is a request under sample_data/person.schema.json that walks its grammar by sampling
a uniformly random allowed token from its own mask each step (so rows sit in different grammar
states, as in real traffic); a row whose grammar terminates starts over as a new request.

Part 1 times the pieces of one step with xgrammar directly, the per-row way (a Python
accept_token + is_terminated per row, a fresh mask tensor, a CPU AND of the JSON control-byte
ban) against the batched way (one batch_accept_token, a reused buffer, no host AND), and the
mask fill at each thread count. Part 2 times the engine's own StructuredOutputManager.fill per
step. Pinned allocation and the host-to-device copy need CUDA: on a CPU-only machine the
allocation is a plain one and the copy a host memcpy of the same bytes. One table last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from tokenmill.engine.model_source import resolve_model
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.engine.structured_output import StructuredOutputManager

ROOT = Path(__file__).resolve().parents[1]
EOS = 2  # the default model's <|im_end|>


def random_allowed(bitmask: torch.Tensor, vocab_size: int, rng: np.random.Generator) -> list[int]:
    """One uniformly random allowed token per bitmask row (not timed)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    scores = rng.random(bits.shape, dtype=np.float32) * bits
    return scores[:, :vocab_size].argmax(axis=1).tolist()


class Walk:
    """num_rows requests that each sample an allowed token per step."""

    def __init__(self, manager, params, num_rows, vocab_size, seed=0):
        self.manager, self.params, self.vocab_size = manager, params, vocab_size
        self.rng = np.random.default_rng(seed)
        self.num_new = 0
        self.reqs = [self.new_req() for _ in range(num_rows)]

    def new_req(self) -> Request:
        self.num_new += 1
        return Request(f"r{self.num_new}", [1], self.params, 0, 256, eos_token_ids=frozenset({EOS}))

    def advance(self, bitmask: torch.Tensor) -> None:
        """Append a sampled allowed token to every row; restart rows that emitted EOS."""
        for i, t in enumerate(random_allowed(bitmask, self.vocab_size, self.rng)):
            req = self.reqs[i]
            if t == EOS or req.num_output_tokens >= 200:
                self.reqs[i] = self.new_req()
            else:
                req.output_token_ids.append(t)


def time_manager(model_dir, vocab_size, params, num_rows, num_steps, threads) -> float:
    """µs per row per step of StructuredOutputManager.fill: advance + masks (the JSON ban is
    applied on the device)."""
    manager = StructuredOutputManager(model_dir, vocab_size, num_rows, num_threads=threads)
    walk = Walk(manager, params, num_rows, vocab_size)
    manager.fill(walk.reqs)  # compile + first masks: not timed
    total = 0.0
    for _ in range(num_steps):
        t0 = time.perf_counter()
        masks = manager.fill(walk.reqs)
        total += time.perf_counter() - t0
        walk.advance(masks.host_bitmask_with_ban())
    return total / num_steps / num_rows * 1e6


def time_parts(model_dir, vocab_size, params, num_rows, num_steps, threads_list) -> dict:
    """µs per row of each piece, the per-row way and the batched way."""
    import xgrammar as xgr

    manager = StructuredOutputManager(model_dir, vocab_size)
    walk = Walk(manager, params, num_rows, vocab_size)
    compiled = manager._compile(params.structured_outputs.key)
    safe = manager._json_safe_words()
    words = manager.num_words
    stop = [EOS]
    matchers = {}  # req -> (matcher, num_consumed)
    batch = {t: xgr.BatchGrammarMatcher(max_threads=t) for t in threads_list}
    batch["auto"] = xgr.BatchGrammarMatcher()
    buf = torch.full((num_rows, words), -1, dtype=torch.int32)
    t = dict.fromkeys(
        ["advance loop", "advance batch", "alloc", "and", "copy"]
        + [f"fill {k} threads" for k in batch],
        0.0,
    )
    for _ in range(num_steps):
        # the engine's bookkeeping: which matcher, which new token (the same both ways)
        ms, toks = [], []
        for req in walk.reqs:
            if req not in matchers:
                matchers[req] = [xgr.GrammarMatcher(compiled, override_stop_tokens=stop), 0]
            entry = matchers[req]
            if entry[1] < req.num_output_tokens:
                ms.append(entry[0])
                toks.append(req.output_token_ids[entry[1]])
                entry[1] += 1
        # the per-row way, on forks of the matchers (rolled back below)
        t0 = time.perf_counter()
        for m, tok in zip(ms, toks):
            if m.accept_token(tok):
                m.is_terminated()
        t["advance loop"] += time.perf_counter() - t0
        xgr.BatchGrammarMatcher.batch_rollback(ms, 1)
        t0 = time.perf_counter()
        ok = xgr.BatchGrammarMatcher.batch_accept_token(ms, toks)
        t["advance batch"] += time.perf_counter() - t0
        assert all(ok)
        row_ms = [matchers[r][0] for r in walk.reqs]
        for k, b in batch.items():
            t0 = time.perf_counter()
            b.batch_fill_next_token_bitmask(row_ms, buf)
            t[f"fill {k} threads"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh = torch.full((num_rows, words), -1, dtype=torch.int32)
        t["alloc"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        buf &= safe
        t["and"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh.copy_(buf)
        t["copy"] += time.perf_counter() - t0
        walk.advance(buf)
    return {k: v / num_steps / num_rows * 1e6 for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    model_dir, name = resolve_model(None)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    schema = json.loads((ROOT / "sample_data/person.schema.json").read_text())
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
    torch.set_num_threads(1)
    print(f"{name}: vocab {vocab_size}, {args.rows} rows, {args.steps} steps, cuda: no")
    parts = time_parts(model_dir, vocab_size, params, args.rows, args.steps, args.threads)
    engine = {
        t: time_manager(model_dir, vocab_size, params, args.rows, args.steps, t)
        for t in args.threads
    }
    print("\n| piece | µs / row / step |")
    print("|---|---:|")
    for k, v in parts.items():
        print(f"| {k} | {v:.2f} |")
    for t, v in engine.items():
        print(f"| engine StructuredOutputManager.fill, {t} threads | {v:.2f} |")


if __name__ == "__main__":
    main()
