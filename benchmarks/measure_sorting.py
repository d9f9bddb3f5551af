"""Measure what sorting a window buys: `tokenmill generate` with --sort and --no-sort.

    python3 benchmarks/measure_sorting.py [--model PATH] [--docs 100] [--questions 5] ...

The workload is the common batch-job shape where sorting matters: several questions about each
of many documents, rows shuffled (so one document's questions are far apart), varied lengths
and output budgets. Sorting puts rows that share a document side by side (prefix-cache hits
while the document's KV blocks are still resident) and starts the longest work first. Each
setting runs in its own process on the same input; the reports give tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from it an be this are which or "
    "model token batch cache block prefix window sort engine kernel paged attention layer "
    "river mountain city market garden winter summer letter number answer question"
).split()


def make_input(path: Path, num_docs: int, questions: int, doc_words: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    rows = []
    for d in range(num_docs):
        doc = " ".join(rng.choice(WORDS) for _ in range(rng.randint(doc_words // 2, doc_words)))
        for q in range(questions):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            rows.append(
                {
                    "id": f"d{d}-q{q}",
                    "prompt": f"Document {d}: {doc}\nQuestion: {question}",
                    "sampling": {"max_tokens": rng.choice((8, 16, 32, 64))},
                }
            )
    rng.shuffle(rows)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def run_in_process(inp: Path, out: Path, sort: bool, model: str, kv: str | None) -> dict:
    """The same job through tokenmill.io.job (no typer/rich needed), a fresh engine each time."""
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.sampling_params import SamplingParams
    from tokenmill.io.job import JobConfig, run_job

    engine = EngineConfig(model=model, kv_cache_memory=kv)
    cfg = JobConfig(
        input=str(inp),
        output=str(out),
        engine=engine,
        sort=sort,
        overwrite=True,
        quiet=True,
        sampling=SamplingParams(temperature=0, ignore_eos=True),
    )
    assert run_job(cfg) == 0
    return json.loads(Path(str(out) + ".report.json").read_text())


def make_random_model(path: Path) -> str:
    """A random-weight model of SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from factories import make_tiny_model

    make_tiny_model(
        path,
        arch="llama",
        hidden_size=576,
        num_layers=30,
        intermediate_size=1536,
        max_position_embeddings=4096,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    return str(path)


def run(inp: Path, out: Path, sort: bool, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "generate",
        str(inp),
        "-o",
        str(out),
        "--overwrite",
        "--quiet",
        "--temperature",
        "0",
        "--ignore-eos",
        "--sort" if sort else "--no-sort",
        *extra,
    ]
    subprocess.run(cmd, check=True)
    return json.loads(Path(str(out) + ".report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--doc-words", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run the job through tokenmill.io.job instead of the CLI",
    )
    ap.add_argument(
        "--random-model",
        action="store_true",
        help="(with --in-process) a random model of SmolLM2-135M's shape",
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--kv-cache-memory", default=None)
    ap.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        help="passed to tokenmill generate, e.g. -- --model PATH --kv-cache-memory 64MiB",
    )
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "docs.jsonl"
        num_rows = make_input(inp, args.docs, args.questions, args.doc_words)
        print(f"{num_rows} rows; options: {' '.join(extra) or ''} kv={args.kv_cache_memory}")
        model = make_random_model(Path(tmp) / "model") if args.random_model else args.model
        if not args.in_process:
            extra += ["--model", model] if model else []
            extra += ["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else []
        results = {True: [], False: []}
        for _ in range(args.repeats):
            for sort in (False, True):
                out = Path(tmp) / f"out-{sort}.jsonl"
                results[sort].append(
                    run_in_process(inp, out, sort, model, args.kv_cache_memory)
                    if args.in_process
                    else run(inp, out, sort, extra)
                )
        for sort in (False, True):
            best = max(results[sort], key=lambda r: r["this_run"]["tokens_per_s"]["total"])
            walls = ", ".join(f"{r['this_run']['wall_time_s']:.2f}" for r in results[sort])
            print(f"  all runs' wall times (s): {walls}")
            run_ = best["this_run"]
            eng = best["engine"]
            print(
                f"{'--sort   ' if sort else '--no-sort'}  wall {run_['wall_time_s']:7.2f} s  "
                f"total {run_['tokens_per_s']['total']:9,.0f} tok/s  "
                f"out {run_['tokens_per_s']['output']:8,.0f} tok/s  "
                f"prefix hit {eng.get('prefix_cache_hit_rate', 0):.2f}  "
                f"batch {eng.get('mean_batch_size', 0):.1f}  "
                f"preempt {eng.get('preemptions', 0)}  "
                f"[{best['model']} {best['dtype']} {best['device']}]"
            )


if __name__ == "__main__":
    main()
