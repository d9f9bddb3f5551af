"""Host cost of constrained decoding per engine step: grammar advance + bitmask fill for every
constrained row, with the default model's tokenizer (no model run).

    PYTHONPATH=. python benchmarks/structured_overhead.py [--rows 64 256] [--threads N]

Each row walks a valid output of sample_data/person.schema.json token by token, as the engine
does between steps (accept the previous token, fill the next mask). Apply (the -inf fill on the
logits) runs in torch on the CPU here; on a GPU it is one kernel launch (kernels/bitmask.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from tokenmill.engine.model_source import resolve_model
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.engine.structured_output import StructuredOutputManager

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    args = ap.parse_args()
    model_dir, name = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    schema = json.loads((ROOT / "sample_data/person.schema.json").read_text())
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
    answer = json.dumps({"name": "Ada Lovelace", "age": 36, "city": "London", "job": "writer"})
    ids = tok(answer, add_special_tokens=False).input_ids
    threads = torch.get_num_threads()
    print(f"{name}: vocab {vocab_size}, {len(ids)} tokens per output, {threads} torch threads")
    for num_rows in args.rows:
        manager = StructuredOutputManager(model_dir, vocab_size)
        reqs = [
            Request(f"r{i}", [1], params, seed=0, max_tokens=64, eos_token_ids=frozenset({2}))
            for i in range(num_rows)
        ]
        manager.prefetch(reqs)
        logits = torch.zeros(num_rows, vocab_size)
        manager.apply(logits, reqs)  # compile + first masks: not timed
        fill_s = apply_s = 0.0
        for t in ids[:-1]:
            for r in reqs:
                r.output_token_ids.append(t)
            t0 = time.perf_counter()
            filled = manager.fill_bitmask(reqs)
            t1 = time.perf_counter()
            from tokenmill.engine.structured_output import apply_token_bitmask_torch_

            apply_token_bitmask_torch_(logits, filled[0], torch.tensor(filled[1]))
            apply_s += time.perf_counter() - t1
            fill_s += t1 - t0
        steps = len(ids) - 1
        print(
            f"{num_rows:4d} rows: advance + fill {fill_s / steps * 1e3:6.2f} ms/step "
            f"({fill_s / steps / num_rows * 1e6:5.1f} us/row), torch apply "
            f"{apply_s / steps * 1e3:6.2f} ms/step"
        )


if __name__ == "__main__":
    main()
