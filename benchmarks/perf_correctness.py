"""GPU checks before benchmarks/run_perf.sh times anything (exits non-zero on a failure).

1. Greedy float32 parity with transformers, token for token, for every tiny architecture, with
   CUDA graphs on and steps that mix decodes and prefill chunks (max_num_batched_tokens 64,
   staggered output lengths): every step must replay a graph, mixed ones the piecewise graphs.
2. Sort-free top-p / top-k on the full Qwen3 vocabulary: kept sets equal the torch reference
   mask, top-p 0.95 draws follow the renormalised distribution, and the cost of top-p over plain
   temperature sampling (the issue's bar: at most 10% of a W2 step).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from factories import ARCHS  # noqa: E402
from gpu_correctness import (  # noqa: E402
    PROMPTS,
    hf_greedy,
    hf_reference,
    tiny_gpu_llm,
    tiny_gpu_model,
)

from tokenmill import SamplingParams  # noqa: E402
from tokenmill.engine.torch_draw import top_k_top_p_min_p_mask  # noqa: E402
from tokenmill.kernels.sampling import sample, sample_tokens, sampling_thresholds  # noqa: E402

MAX_TOKENS = [24, 5, 17, 9, 30, 12, 3, 20, 7, 14]  # staggered: admissions while others decode


def graph_parity() -> tuple[dict, bool]:
    rows, ok = {}, True
    for arch in ARCHS:
        d = tiny_gpu_model(arch)
        llm = tiny_gpu_llm(d, max_num_seqs=4, max_num_batched_tokens=64)
        pw = llm.runner.piecewise
        assert pw is not None, "piecewise graphs were not captured"
        pw_runs = [0]
        pw_run = pw.run

        def counted(*a, _run=pw_run, _n=pw_runs):
            _n[0] += 1
            return _run(*a)

        pw.run = counted
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        stats = llm.stats
        hf = hf_reference(d)
        same = sum(
            hf_greedy(hf, p, n) == o.outputs[0].token_ids
            for p, n, o in zip(PROMPTS, MAX_TOKENS, outs)
        )
        all_graphed = stats.eager_steps == 0 and stats.graph_steps == stats.num_steps
        ok &= same == len(PROMPTS) and all_graphed and pw_runs[0] > 0
        rows[arch] = (
            f"{same}/{len(PROMPTS)} same; steps {stats.num_steps}: graph {stats.graph_steps} "
            f"(piecewise {pw_runs[0]}), eager {stats.eager_steps}"
        )
        del llm, hf
        torch.cuda.empty_cache()
    return rows, ok


def _time_ms(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _sampling_ms(rows: int, vocab: int = 151936) -> str:
    """Plain temperature sampling vs temperature + top-p 0.95, and torch.sort for scale."""
    logits = torch.randn(rows, vocab, device="cuda") * 3
    temps = torch.full((rows,), 0.8, device="cuda")
    seeds = torch.arange(rows, device="cuda")
    pos = torch.zeros(rows, dtype=torch.long, device="cuda")
    top_p = torch.full((rows,), 0.95, device="cuda")
    plain = _time_ms(lambda: sample(logits, temps, seeds, pos))
    nucleus = _time_ms(lambda: sample(logits, temps, seeds, pos, top_p=top_p))
    sort = _time_ms(lambda: (logits / 0.8).sort(dim=-1, descending=True))
    return f"temperature {plain:.3f} ms, with top-p {nucleus:.3f} ms, torch.sort {sort:.3f} ms"


def top_p_sanity() -> tuple[dict, bool]:
    vocab = 151936
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(256, vocab, device="cuda", generator=gen) * 3
    temps = torch.full((256,), 0.8, device="cuda")
    top_p = torch.full((256,), 0.95, device="cuda")
    top_k = torch.full((256,), 50, device="cuda", dtype=torch.long)
    off_k, off_min_p = torch.full_like(top_k, -1), torch.zeros_like(top_p)
    kept = logits >= sampling_thresholds(logits, temps, top_p=top_p)[:, None]
    ref = top_k_top_p_min_p_mask(logits / 0.8, off_k, top_p, off_min_p)
    same_p = int((kept == ref).all(dim=-1).sum())
    # a token may flip only where float32 sums cannot tell: mass before it within 1e-5 of top_p
    probs = (logits / 0.8).softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = torch.empty_like(probs).scatter_(1, order, sorted_probs.cumsum(-1) - sorted_probs)
    flipped = kept != ref
    boundary_only = bool(((mass_before[flipped] - 0.95).abs() < 1e-5).all())
    kept_k = logits >= sampling_thresholds(logits, temps, top_k=top_k)[:, None]
    same_k = int(
        (kept_k == top_k_top_p_min_p_mask(logits, top_k, 1 + off_min_p, off_min_p)).all(-1).sum()
    )
    # 200,000 top-p draws of one row (stride 0: every draw reads the same row), threshold once
    n = 200_000
    thr = sampling_thresholds(logits[:1], temps[:1], top_p=top_p[:1])
    tokens = sample_tokens(
        logits[:1].expand(n, -1), temps[:1].expand(n).contiguous(),
        torch.full((n,), 7, device="cuda"), torch.arange(n, device="cuda"),
        thr.expand(n).contiguous(),
    )  # fmt: skip
    expected = (logits[0] / 0.8).masked_fill(~ref[0], float("-inf")).softmax(-1)
    freq = torch.bincount(tokens, minlength=vocab).float() / n
    tvd = 0.5 * (freq - expected).abs().sum().item()
    # the total variation sampling noise alone would give: 0.5 * sum sqrt(2 p (1 - p) / (pi n))
    noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * n)).sqrt().sum().item()
    inside = bool(kept[0][tokens].all())  # draws respect the threshold
    timings = {f"{rows} rows": _sampling_ms(rows) for rows in (256, 1024)}
    ok = (same_p == 256 or boundary_only) and same_k == 256 and inside and tvd < 1.5 * noise + 0.005
    return {
        "top_p_0.95_kept_sets_equal_reference": f"{same_p}/256 rows"
        + (
            ""
            if same_p == 256
            else f" ({int(flipped.sum())} boundary tokens flip: {boundary_only})"
        ),
        "top_k_50_kept_sets_equal_reference": f"{same_k}/256",
        "top_p_draws_inside_kept_set": inside,
        "top_p_draws_total_variation": f"{tvd:.4f} (sampling noise alone: {noise:.4f})",
        "kept_tokens_per_row": int(ref.sum(-1).float().mean()),
        "sampling_ms": timings,
    }, ok


if __name__ == "__main__":
    parity, ok1 = graph_parity()
    top_p, ok2 = top_p_sanity()
    print(json.dumps({"float32_greedy_parity_with_graphs": parity, "top_p": top_p}, indent=2))
    print("CORRECTNESS", "OK" if ok1 and ok2 else "FAILED")
    sys.exit(0 if ok1 and ok2 else 1)
