"""Sliding-window block freeing and the shape sweep on the GPU, in one command:

    python3 benchmarks/gpu_sliding_window.py          (logs under $OUT, default out/gpu)

1. The new tests compiled on the device: the Triton kernels never reading freed block-table
   entries (tests/kernels/test_window_freed_blocks.py at full shapes), the windowed engine
   (tests/engine/test_sliding_window.py) and the shape sweep (tests/engine/test_parity_shapes.py)
   with TOKENMILL_TEST_DEVICE=cuda (Triton attention, CUDA graphs, overlapped steps).
2. Long requests on a tiny float32 Mistral (window 64, head_dim 16) whose KV cache holds 12
   blocks of 16 tokens (192 tokens), far less than each request: greedy tokens vs transformers
   (eager attention, on the GPU), the most blocks any request held, and the wall time.
Prints a short table last; exits non-zero if anything fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = Path(os.environ.get("OUT", ROOT / "out" / "gpu"))
DEVICE = os.environ.get("TOKENMILL_BENCH_DEVICE", "cuda")  # cpu: a dry run of part 2

WINDOW, BLOCK_SIZE, NUM_BLOCKS, NEW_TOKENS = 64, 16, 12, 32
PROMPT_LENS = (600, 1500, 40)


def run_tests() -> dict[str, str]:
    env = {**os.environ, "TOKENMILL_TEST_DEVICE": "cuda", "PYTHONPATH": str(ROOT)}
    rows = {}
    for path in (
        "tests/kernels/test_window_freed_blocks.py",
        "tests/engine/test_sliding_window.py",
        "tests/engine/test_parity_shapes.py",
    ):
        log = OUT / (Path(path).stem + ".log")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        log.write_text(proc.stdout + proc.stderr)
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        rows[path] = ("ok: " if proc.returncode == 0 else "FAIL: ") + last
    return rows


def long_requests() -> dict[str, str]:
    from factories import make_tiny_model
    from transformers import AutoModelForCausalLM

    from tokenmill import LLM, SamplingParams

    d = make_tiny_model(
        tempfile.mkdtemp(),
        arch="mistral",
        hidden_size=64,
        head_dim=16,
        sliding_window=WINDOW,
        max_position_embeddings=4096,
    )
    layers, kv_heads, head_dim = 2, 1, 16  # factories' mistral: 2 layers, 1 KV head
    block_bytes = 2 * layers * BLOCK_SIZE * kv_heads * head_dim * 4
    llm = LLM(
        model=str(d),
        dtype="float32",
        device=DEVICE,
        block_size=BLOCK_SIZE,
        kv_cache_memory=NUM_BLOCKS * block_bytes,
        max_num_batched_tokens=256,
    )
    assert llm.num_kv_blocks == NUM_BLOCKS, llm.num_kv_blocks
    bm = llm.scheduler.block_manager
    live = [0]
    inner = llm.scheduler.schedule

    def schedule():
        out = inner()
        reqs = list(llm.scheduler.running) + list(llm.scheduler.waiting)
        bm.check_invariants(reqs)
        live[0] = max([live[0]] + [bm.num_live_blocks(r) for r in reqs])
        return out

    llm.scheduler.schedule = schedule
    prompts = [[(13 * i + 7 * j) % 300 + 5 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager"
    ).to(DEVICE)
    same = 0
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p], device=DEVICE)
        ref = hf.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        same += ref == o.outputs[0].token_ids
    bound = bm.max_blocks_held(10**6)
    return {
        "greedy parity": f"{same}/{len(prompts)}",
        "KV cache": f"{NUM_BLOCKS} blocks x {BLOCK_SIZE} tokens; prompts {PROMPT_LENS}",
        "most blocks one request held": f"{live[0]} (window bound {bound}, + a 256-token chunk)",
        "preemptions": str(llm.stats.num_preemptions),
        "wall seconds": f"{seconds:.2f}",
        "ok": str(same == len(prompts) and bm.num_free_blocks == NUM_BLOCKS),
    }


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    tests = run_tests() if DEVICE == "cuda" else {}
    long = long_requests()
    lines = ["| check | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**tests, **long}.items()]
    table = "\n".join(lines)
    (OUT / "sliding_window.md").write_text(table + "\n")
    print(table)
    ok = all(v.startswith("ok") for v in tests.values()) and long["ok"] == "True"
    sys.exit(0 if ok else 1)
