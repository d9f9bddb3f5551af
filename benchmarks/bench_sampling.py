"""Sort-free top-p / top-k / min-p on the GPU: exactness at full size, then timings.

    python3 benchmarks/bench_sampling.py        # one H200 call, under 3 minutes

1. Exactness at 256 x 151,936 (float32 logits), "random" (dummy-weight-like: a wide, flat
   softmax, top-p 0.95 keeps most of the vocab), "bf16" (the same rounded to bfloat16, as a
   bf16 model's logits are: many exact ties) and "peaked" (a few likely tokens and a tail):
   the kernel's kept set {logits >= threshold} against the engine's sorted torch mask
   (`engine/torch_draw.py: top_k_top_p_min_p_mask`) for top-p 0.95, top-k 50, top-k 50 + top-p 0.9
   and min-p 0.05. A row that differs passes only when the differing tokens are ties or hold
   under 1e-5 of the row's probability together (float32 sums of 150k terms in another order);
   it also reports how many search passes the rows needed (of passes_per_filter() launched).
2. CUDA-graph capture and replay of top-p sampling gives the same tokens as eager.
3. Timings (CUDA events after warm-up, median of 20; bf16-valued logits) at 64 / 256 / 1,024
   rows: plain temperature, temperature + top-p 0.95 (eager and replayed from a CUDA graph),
   top-k 50, top-k 50 + top-p 0.9, min-p 0.05, torch.sort-based top-p (the reference mask +
   the same draw), and at 256 rows the threshold alone per pivot split (value pivots, key
   pivots) next to the module's default (8, 8).

4. Top-p by rejection (kernels/rejection_sampling.py, the default path of `sample` for top-p
   without top-k) against the threshold path (TOKENMILL_TOPP_PATH=threshold): the same token
   per row at 256 x 151,936 on random / bf16 / peaked logits for top-p 0.95, 0.9, 0.5,
   top-p 0.95 + min-p 0.05 and a per-row mix (greedy, plain, top-p 0.3..1, min-p); a row that
   differs passes only when its nucleus boundary is within 1e-5 of top_p (float64), i.e. a
   float32 rounding of the cut. It logs how many rows kept their first candidate (the plain
   draw's token), times both paths (eager and CUDA graph), the rejection path per number of
   rounds R, and the fallback's launches alone (every row decided: the early-exit cost).

Logs and the table go to $OUT (or out/bench_sampling); the table is printed last. The pivot
sweep of the threshold search (pre-rejection tuning) runs only with BENCH_PIVOTS=1.
"""

from __future__ import annotations

import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenmill.kernels.rejection_sampling as rs  # noqa: E402
import tokenmill.kernels.threshold_search as ts  # noqa: E402
from tokenmill.engine.torch_draw import top_k_top_p_min_p_mask  # noqa: E402
from tokenmill.kernels.sampling import sample, sample_tokens  # noqa: E402

VOCAB = 151936
DEV = "cuda"
TEMP = 0.8
CHECK_ROWS = 256
BATCHES = (64, 256, 1024)


def make_logits(num_seqs: int, kind: str, seed: int = 0) -> torch.Tensor:
    """random: N(0, 2^2) float32; bf16: the same rounded to bfloat16 (what a bf16 model's
    logits look like after .float(): many exact ties); peaked: a tail and 32 likely tokens."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(num_seqs, VOCAB, generator=gen, device=DEV)  # [num_seqs, vocab_size]
    if kind == "random":
        return x * 2.0
    if kind == "bf16":
        return (x * 2.0).bfloat16().float()
    # peaked: a tail at std 2 and 32 tokens per row lifted 8..16 above it
    idx = torch.randint(0, VOCAB, (num_seqs, 32), generator=gen, device=DEV)
    lift = torch.linspace(8.0, 16.0, 32, device=DEV).expand(num_seqs, -1)
    return (x * 2.0).scatter_add_(1, idx, lift)


def filters_for(name: str, n: int) -> dict:
    full = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt, device=DEV)  # noqa: E731
    return {
        "plain": {},
        "top_p 0.95": {"top_p": full(0.95)},
        "top_k 50": {"top_k": full(50, torch.int64)},
        "top_k 50 + top_p 0.9": {"top_k": full(50, torch.int64), "top_p": full(0.9)},
        "min_p 0.05": {"min_p": full(0.05)},
    }[name]


def check_row(kept, ref, x, temp):
    """'same', 'ties / rounding' or 'WRONG' for one row."""
    if torch.equal(kept, ref):
        return "same"
    diff = kept ^ ref
    cut = x[ref].min()
    if (x[diff] == cut).all():
        return "ties / rounding"
    p = torch.softmax(x.double() / temp, -1)
    if p[diff].sum() < 1e-5 * p[ref].sum():
        return "ties / rounding"
    return "WRONG"


def passes_needed(logits, temps, filters) -> int:
    """The fewest search passes after which every row's threshold is final."""
    final = ts.sampling_thresholds(logits, temps, **filters)
    for n in range(1, ts.passes_per_filter(ts.NUM_KEY_PIVOTS) * 2 + 1):
        if torch.equal(ts.sampling_thresholds(logits, temps, **filters, num_passes=n), final):
            return n
    return -1


def exactness(log) -> bool:
    ok = True
    n = CHECK_ROWS
    temps = torch.full((n,), TEMP, device=DEV)
    for kind in ("random", "bf16", "peaked"):
        logits = make_logits(n, kind, seed=1)
        for name in ("top_p 0.95", "top_k 50", "top_k 50 + top_p 0.9", "min_p 0.05"):
            f = filters_for(name, n)
            thr = ts.sampling_thresholds(logits, temps, **f)
            kept = logits >= thr[:, None]
            ref = top_k_top_p_min_p_mask(
                logits / TEMP,
                f.get("top_k", torch.full((n,), -1, device=DEV)),
                f.get("top_p", torch.ones(n, device=DEV)),
                f.get("min_p", torch.zeros(n, device=DEV)),
            )
            verdicts = [check_row(kept[i], ref[i], logits[i], TEMP) for i in range(n)]
            counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
            needed = passes_needed(logits, temps, f) if ("top" in name) else 0
            ok &= "WRONG" not in counts
            log(
                f"exactness {kind:6s} {name:22s} kept/row {kept.sum(1).float().mean():9.1f}  "
                f"rows {counts}  passes needed {needed}"
            )
    return ok


def threshold_path(fn, *args, **kwargs):
    """fn under TOKENMILL_TOPP_PATH=threshold (the pre-rejection path of `sample`)."""
    os.environ["TOKENMILL_TOPP_PATH"] = "threshold"
    try:
        return fn(*args, **kwargs)
    finally:
        os.environ.pop("TOKENMILL_TOPP_PATH")


def boundary_gap(x, temp, top_p) -> float:
    """min over distinct logits v of |mass(> v) / total - top_p|, in float64: how close the
    row's nucleus cut is to a float32 rounding flip."""
    if top_p >= 1.0 or temp == 0.0:
        return float("inf")  # no cut: such a row never differs for rounding
    p = torch.softmax(x.double() / temp, -1)
    vals, counts = torch.unique(x, sorted=True, return_counts=True)  # ascending
    grouped = torch.zeros(vals.numel(), dtype=torch.float64, device=x.device)
    grouped.index_add_(0, torch.searchsorted(vals, x), p)
    above = grouped.flip(0).cumsum(0).flip(0) - grouped  # mass strictly above each value
    return float((above - top_p).abs().min())


def reject_cases(n: int) -> dict:
    """name -> (temperatures, {top_p, min_p}) for the rejection-vs-threshold check."""
    full = lambda v: torch.full((n,), v, device=DEV)  # noqa: E731
    gen = torch.Generator(device=DEV).manual_seed(9)
    mixed_t = torch.rand(n, generator=gen, device=DEV) * 1.3 + 0.2
    mixed_t[::7] = 0.0  # greedy rows
    mixed_p = torch.rand(n, generator=gen, device=DEV) * 0.7 + 0.3
    mixed_p[1::5] = 1.0  # plain rows
    mixed_min_p = torch.where(torch.arange(n, device=DEV) % 3 == 0, 0.02, 0.0)
    return {
        "top_p 0.95": (full(TEMP), {"top_p": full(0.95)}),
        "top_p 0.9": (full(TEMP), {"top_p": full(0.9)}),
        "top_p 0.5": (full(TEMP), {"top_p": full(0.5)}),
        "top_p 0.95 + min_p 0.05": (full(TEMP), {"top_p": full(0.95), "min_p": full(0.05)}),
        "mixed rows": (mixed_t, {"top_p": mixed_p, "min_p": mixed_min_p}),
    }


def reject_exactness(log) -> bool:
    """The rejection path's token equals the threshold path's on every row, up to cuts within
    1e-5 of top_p; logs the share of rows whose first candidate (the plain draw) was kept."""
    ok = True
    n = CHECK_ROWS
    seeds = torch.arange(n, device=DEV) * 7919
    for kind in ("random", "bf16", "peaked"):
        logits = make_logits(n, kind, seed=5)
        for name, (temps, f) in reject_cases(n).items():
            for step in range(2):
                positions = torch.full((n,), step, dtype=torch.long, device=DEV)
                new = sample(logits, temps, seeds, positions, **f)
                old = threshold_path(sample, logits, temps, seeds, positions, **f)
                first = sample_tokens(logits, temps, seeds, positions)
                differ = (new != old).nonzero().flatten().tolist()
                gaps = [
                    boundary_gap(logits[i], float(temps[i]), float(f["top_p"][i])) for i in differ
                ]
                wrong = sum(g >= 1e-5 for g in gaps)
                ok &= wrong == 0
                log(
                    f"reject {kind:6s} {name:24s} step {step}: differ {len(differ)} / {n} "
                    f"(cut within 1e-5: {len(differ) - wrong}, WRONG: {wrong})  first candidate "
                    f"kept {(new == first).float().mean():.3f}"
                )
    return ok


def graph_replay(log) -> bool:
    n = CHECK_ROWS
    logits = make_logits(n, "random", seed=2)
    temps = torch.full((n,), TEMP, device=DEV)
    seeds = torch.arange(n, device=DEV)
    positions = torch.zeros(n, dtype=torch.long, device=DEV)
    f = filters_for("top_p 0.95", n)
    same = True
    for path in ("threshold", "reject"):
        os.environ["TOKENMILL_TOPP_PATH"] = path
        try:
            eager = sample(logits, temps, seeds, positions, **f)
            graph, out = capture(lambda: sample(logits, temps, seeds, positions, **f))
            graph.replay()
            torch.cuda.synchronize()
        finally:
            os.environ.pop("TOKENMILL_TOPP_PATH")
        same &= torch.equal(out, eager)
        log(f"CUDA graph replay of top-p sampling ({path}) equals eager: {torch.equal(out, eager)}")
    return same


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_ms(fn, iters=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sort_top_p(logits, temps, seeds, positions, top_p):
    """The pre-kernel path: the sorted reference mask, then the same draw."""
    n = logits.shape[0]
    keep = top_k_top_p_min_p_mask(
        logits / temps[:, None], torch.full((n,), -1, device=DEV), top_p, torch.zeros(n, device=DEV)
    )
    return sample_tokens(logits.masked_fill(~keep, float("-inf")), temps, seeds, positions)


def time_batch(n: int) -> list[tuple]:
    """(rows, case, ms, ratio to plain temperature) for one batch size, bf16-valued logits."""
    logits = make_logits(n, "bf16", seed=3)
    temps = torch.full((n,), TEMP, device=DEV)
    seeds = torch.arange(n, device=DEV)
    positions = torch.zeros(n, dtype=torch.long, device=DEV)
    args = (logits, temps, seeds, positions)
    base = time_ms(partial(sample_tokens, *args))
    rows = [(n, "plain temperature", base, 1.0)]
    graph, _ = capture(partial(sample_tokens, *args))
    base_graph = time_ms(graph.replay)
    rows.append((n, "plain temperature, CUDA graph", base_graph, 1.0))
    f = filters_for("top_p 0.95", n)
    for path in ("threshold", "reject"):
        os.environ["TOKENMILL_TOPP_PATH"] = path
        try:
            ms = time_ms(partial(sample, *args, **f))
            rows.append((n, f"top_p 0.95, {path}", ms, ms / base))
            graph, _ = capture(partial(sample, *args, **f))
            ms = time_ms(graph.replay)
            rows.append((n, f"top_p 0.95, {path}, CUDA graph", ms, ms / base_graph))
        finally:
            os.environ.pop("TOKENMILL_TOPP_PATH")
    fm = {"top_p": f["top_p"], "min_p": filters_for("min_p 0.05", n)["min_p"]}
    ms = time_ms(partial(sample, *args, **fm))
    rows.append((n, "top_p 0.95 + min_p 0.05, reject", ms, ms / base))
    for name in ("top_k 50", "top_k 50 + top_p 0.9", "min_p 0.05"):
        ms = time_ms(partial(sample, *args, **filters_for(name, n)))
        rows.append((n, name, ms, ms / base))
    ms = time_ms(partial(sort_top_p, *args, f["top_p"]))
    rows.append((n, "top_p 0.95, torch.sort", ms, ms / base))
    return rows


def fallback_only(logits, temps, seeds, positions, top_p):
    """The rejection path's fallback launches with every row decided (temperature 0 there)."""
    n, vocab = logits.shape
    row_chunk = -(-vocab // (4 * rs.Q)) * 4 * rs.Q
    zero = torch.zeros_like(temps)
    thr = ts.sampling_thresholds(logits, zero, None, top_p, None, split_size=row_chunk)
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    rs._fallback_draw_kernel[(n,)](
        out, logits, zero, thr, seeds, positions, vocab, logits.stride(0),
        ROW_CHUNK=row_chunk, Q=rs.Q, num_warps=rs.NUM_WARPS,
    )  # fmt: skip
    return out


def rounds_sweep(log) -> list[tuple]:
    """top-p 0.95 by rejection (CUDA graph) per number of rounds R, and the fallback alone."""
    out = []
    for n in BATCHES:
        logits = make_logits(n, "bf16", seed=3)
        temps = torch.full((n,), TEMP, device=DEV)
        seeds = torch.arange(n, device=DEV)
        positions = torch.zeros(n, dtype=torch.long, device=DEV)
        top_p = torch.full((n,), 0.95, device=DEV)
        args = (logits, temps, seeds, positions, top_p)
        for rounds in (1, 2, 3, 4, 6):
            graph, _ = capture(partial(rs.sample_top_p, *args, num_rounds=rounds))
            out.append((n, f"reject R={rounds}", time_ms(graph.replay)))
        graph, _ = capture(partial(fallback_only, *args))
        out.append((n, "fallback launches, all rows decided", time_ms(graph.replay)))
        for r in out[-6:]:
            log(f"rounds {r[0]:5d} rows  {r[1]:36s} {r[2]:8.3f} ms (graph)")
        torch.cuda.empty_cache()
    return out


def timings(log) -> list[tuple]:
    rows = []
    for n in BATCHES:
        batch = time_batch(n)
        for r in batch:
            log(f"time {r[0]:5d} rows  {r[1]:24s} {r[2]:8.3f} ms  x{r[3]:.2f}")
        rows += batch
        torch.cuda.empty_cache()
    return rows


def pivot_sweep(log) -> list[tuple]:
    """top-p 0.95 at 256 rows (graph replay, so launches do not count) per pivot split."""
    out = []
    default = (ts.NUM_VALUE_PIVOTS, ts.NUM_KEY_PIVOTS)
    n = CHECK_ROWS
    temps = torch.full((n,), TEMP, device=DEV)
    f = filters_for("top_p 0.95", n)
    for kind in ("random", "bf16", "peaked"):
        logits = make_logits(n, kind, seed=4)
        for split in ((4, 4), (8, 8), (16, 16), (12, 4)):
            ts.NUM_VALUE_PIVOTS, ts.NUM_KEY_PIVOTS = split
            try:
                graph, _ = capture(partial(ts.sampling_thresholds, logits, temps, **f))
                ms = time_ms(graph.replay)
                needed = passes_needed(logits, temps, f)
            finally:
                ts.NUM_VALUE_PIVOTS, ts.NUM_KEY_PIVOTS = default
            launched = ts.passes_per_filter(split[1])
            out.append((kind, split, ms, needed, launched))
            log(
                f"pivots {kind:6s} value {split[0]:2d} key {split[1]:2d}: threshold {ms:7.3f} ms"
                f"  passes needed {needed} of {launched}"
            )
    return out


def main() -> int:
    out_dir = Path(os.environ.get("OUT", "out/bench_sampling"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "bench_sampling.log", "w")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")

    log(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    ok = exactness(log)
    ok &= reject_exactness(log)
    ok &= graph_replay(log)
    rows = timings(log)
    rounds = rounds_sweep(log)
    sweep = pivot_sweep(log) if os.environ.get("BENCH_PIVOTS") == "1" else []
    table = [
        "",
        f"| rows | case | ms | x plain | (vocab {VOCAB}, T {TEMP}, bf16-valued N(0, 4) logits)",
        "|---|---|---|---|",
    ]
    table += [f"| {n} | {name} | {ms:.3f} | {ratio:.2f} |" for n, name, ms, ratio in rows]
    table += ["", f"| rows | top_p 0.95 by rejection (R = {rs.NUM_ROUNDS} default) | ms (graph) |"]
    table += ["|---|---|---|"]
    table += [f"| {n} | {name} | {ms:.3f} |" for n, name, ms in rounds]
    if sweep:
        table += [
            "",
            "| logits | value pivots | key pivots | threshold ms (graph) "
            "| passes needed / launched |",
            "|---|---|---|---|---|",
        ]
        table += [
            f"| {k} | {s[0]} | {s[1]} | {ms:.3f} | {nd} / {la} |" for k, s, ms, nd, la in sweep
        ]
    table += [
        "",
        f"exactness (threshold and rejection) and graph replay: {'PASS' if ok else 'FAIL'}",
    ]
    for line in table:
        log(line)
    (out_dir / "bench_sampling.md").write_text("\n".join(table) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
