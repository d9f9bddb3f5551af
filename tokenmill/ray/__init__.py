"""Batch inference on a Ray cluster: tokenmill's engine inside `ray.data.Dataset.map_batches`.

    ds = read_input("prompts.jsonl")        # rows numbered as `generate` numbers them
    ds = build_processor(ProcessorConfig(engine, sampling, concurrency=4, num_gpus=1))(ds)
    write_output(ds, "results.jsonl")       # a directory of part files, rows in input order

Needs Ray: `pip install tokenmill[ray]`. `tokenmill generate --ray` runs exactly this (ray/job.py).
Ray is imported only when a name that needs it is used, so `tokenmill --help` stays fast.
"""

from __future__ import annotations

from tokenmill.ray.processor import ProcessorConfig, TokenmillProcessor, build_processor

__all__ = [
    "ProcessorConfig",
    "TokenmillProcessor",
    "build_processor",
    "read_input",
    "write_output",
]


def __getattr__(name: str):
    if name in ("read_input", "write_output"):
        from tokenmill.ray import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'tokenmill.ray' has no attribute {name!r}")
