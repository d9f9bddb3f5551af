"""Top-p (+ min-p) sampling by rejection: Gumbel-max over a superset of the nucleus, kept when
the winner lies in the nucleus. A few passes over the logits instead of a threshold search.

The draw of kernels/sampling.py is token = argmax_i(x_i / T + g_i) over the kept set N, with
Philox noise g keyed by (seed, position, token). N = {x >= t} for a logit threshold t: top-p
keeps token i iff the mass strictly above it, M(> x_i) = sum over x_j > x_i of
exp((x_j - max) / T), is below top_p * total (ties at the cut are in or out together, as in
kernels/threshold_search.py and the engine's reference mask); min-p keeps x_i >= max +
T * log(min_p). With the same noise, for any superset S of N:

    if c = argmax over S of (x / T + g) lies in N, c is the argmax over N: the drawn token.

If c is not in N, no token with x <= x_c is (N is an upper set of the logits), so
S' = {x > x_c} is again a superset of N, and the next candidate is its argmax. Launches:

    _first_kernel   (num_seqs, num_chunks)  the plain draw: per chunk best (score, token) over
                                            all tokens, and max x: candidate c_0
    _round_kernel   (num_seqs, num_chunks)  x R + 1 (1 if R = 1); every program reduces the last
                                            launch's chunk partials (tiny) to decide its row
                                            (accept, or move to the next candidate); a decided
                                            row exits. Then, per kind:
        TEST        mass above c_0 and the total: sum exp((x - max) / T), no noise
        SEARCH      the next candidate above the rejected one: best (score, token) over
                    x > x_c and x >= min-p's bound
        BOTH  x R-1 both at once: tests c_r and finds c_{r+1}
    _final_kernel   (num_seqs,)             decides the last candidate; writes the tokens
    fallback        sampling_thresholds(...) with one split per row, then
                    _fallback_draw_kernel (num_seqs,): the exact threshold path for rows
                    still undecided after R tests; decided rows pass temperature 0 there and
                    exit at once (num_seqs programs a launch, not num_seqs x num_chunks)

TEST, SEARCH, BOTH, BOTH, ... test c_0 .. c_{R-1}. A fixed launch count and no host sync: CUDA
graph safe. The first test is split from the search because most rows stop there: a row
whose c_0 is kept pays the plain draw (+ a max) and one noise-free pass over its logits.

Why R = 4: the mass above a Gumbel-max winner, as a fraction of its candidate set's mass, is
about uniform on (0, 1), so the mass above c_r is a product of r + 1 uniforms and a row is
undecided after R tests with probability P(Poisson(ln(1 / top_p)) >= R): at top_p 0.95 about
3e-7 (0.9: 5e-6, 0.5: 6e-3), so the fallback's passes (one program per row) almost never run
and its launches cost only their early exits. A min-p rejection costs a test more.
In SEARCH and BOTH a tile of 4 * Q tokens none of which is above the pivot skips the noise
and the exps (peaked rows: most tiles).

Chunks (CHUNK = 8,192 tokens, a multiple of 4 * Q) and the noise layout are the draw's in
kernels/sampling.py; chunk sums are reduced in chunk order, so a row's token depends on its own
logits, seed and position only, whatever shares its batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.sampling import CHUNK, NUM_WARPS, Q, _gumbel_score
from tokenmill.kernels.specialize import runtime_args
from tokenmill.kernels.threshold_search import sampling_thresholds

NUM_ROUNDS = 4  # R: see the module docstring
BIG_IDX = tl.constexpr(2147483647)  # "no token" in min-index reductions
# launch kinds (constexpr): the first pass; mass above the candidate (and the total); the next
# candidate above a rejected one; both at once
FIRST, TEST, SEARCH, BOTH = (tl.constexpr(k) for k in range(4))


def launch_kinds(num_rounds: int) -> list[int]:
    """Kinds of the launches after the first pass: R tests of candidates c_0 .. c_{R-1}."""
    if num_rounds == 1:
        return [TEST.value]
    return [TEST.value, SEARCH.value] + [BOTH.value] * (num_rounds - 1)


@triton.jit
def _load(row_ptr, idx, vocab_size):
    return tl.load(row_ptr + idx, mask=idx < vocab_size, other=float("-inf"))


@triton.jit
def _better(best_val, best_idx, x, idx, pivot, bound, temperature, rand, USE_NOISE: tl.constexpr):
    """The draw's `_consider` on loaded logits, restricted to x > pivot and x >= bound."""
    x = tl.where((x > pivot) & (x >= bound), x, float("-inf"))
    if USE_NOISE:
        x = _gumbel_score(x, temperature, rand)
    better = x > best_val  # strict: the earliest token wins ties within a lane
    return tl.where(better, x, best_val), tl.where(better, idx, best_idx)


@triton.jit
def _mass(above, total, x, pivot, row_max, inv_temp, USE_TOTAL: tl.constexpr):
    w = tl.exp((x - row_max) * inv_temp)  # <= 1; 0 for -inf
    above += tl.where(x > pivot, w, 0.0)
    if USE_TOTAL:
        total += w
    return above, total


@triton.jit
def _mass4(above, total, x0, x1, x2, x3, pivot, row_max, inv_temp, USE_TOTAL: tl.constexpr):
    above, total = _mass(above, total, x0, pivot, row_max, inv_temp, USE_TOTAL)
    above, total = _mass(above, total, x1, pivot, row_max, inv_temp, USE_TOTAL)
    above, total = _mass(above, total, x2, pivot, row_max, inv_temp, USE_TOTAL)
    return _mass(above, total, x3, pivot, row_max, inv_temp, USE_TOTAL)


@triton.jit
def _better4(
    best_val, best_idx, x0, x1, x2, x3, base, pivot, bound, temperature, seed, pos_lo, pos_hi,
    Q: tl.constexpr, USE_NOISE: tl.constexpr,
):  # fmt: skip
    """The 4 * Q tokens from base: one Philox call, 4 words (the draw's noise layout)."""
    offs = tl.arange(0, Q)
    zero = tl.zeros([Q], dtype=tl.uint32)
    r0, r1, r2, r3 = zero, zero, zero, zero
    if USE_NOISE:
        counter = (base // 4 + offs).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, counter, zero + pos_lo, zero + pos_hi, zero)
    best_val, best_idx = _better(
        best_val, best_idx, x0, base + offs, pivot, bound, temperature, r0, USE_NOISE
    )
    best_val, best_idx = _better(
        best_val, best_idx, x1, base + Q + offs, pivot, bound, temperature, r1, USE_NOISE
    )
    best_val, best_idx = _better(
        best_val, best_idx, x2, base + 2 * Q + offs, pivot, bound, temperature, r2, USE_NOISE
    )
    return _better(
        best_val, best_idx, x3, base + 3 * Q + offs, pivot, bound, temperature, r3, USE_NOISE
    )


@triton.jit
def _scan_chunk(
    row_ptr,
    chunk_start,
    vocab_size,
    temperature,
    pivot,  # candidates and mass: x > pivot (-inf: every finite token)
    bound,  # candidates: x >= bound (min-p)
    row_max,
    seed,
    pos_lo,
    pos_hi,
    CHUNK: tl.constexpr,
    Q: tl.constexpr,
    USE_NOISE: tl.constexpr,
    FIND: tl.constexpr,
    USE_MAX: tl.constexpr,
    USE_MASS: tl.constexpr,
    USE_TOTAL: tl.constexpr,
    SKIP: tl.constexpr,
):
    """Per chunk: best (score, token) over the candidates x > pivot, x >= bound (FIND); max x
    (USE_MAX); the mass above the pivot (USE_MASS) and over all tokens (USE_TOTAL). SKIP: a tile
    of 4 * Q tokens none of which is above the pivot skips the noise and the exps (a block-wide
    max per tile: worth it only when the pivot is high)."""
    offs = tl.arange(0, Q)
    best_val = tl.full([Q], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([Q], dtype=tl.int32)
    lane_max = tl.full([Q], float("-inf"), dtype=tl.float32)
    above = tl.zeros([Q], dtype=tl.float32)
    total = tl.zeros([Q], dtype=tl.float32)
    inv_temp = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    for it in range(0, CHUNK, 4 * Q):
        base = chunk_start + it
        x0 = _load(row_ptr, base + offs, vocab_size)
        x1 = _load(row_ptr, base + Q + offs, vocab_size)
        x2 = _load(row_ptr, base + 2 * Q + offs, vocab_size)
        x3 = _load(row_ptr, base + 3 * Q + offs, vocab_size)
        tile_max = tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3))
        if USE_MAX:
            lane_max = tl.maximum(lane_max, tile_max)
        if USE_TOTAL:
            above, total = _mass4(above, total, x0, x1, x2, x3, pivot, row_max, inv_temp, True)
        if SKIP:
            m = tl.max(tile_max, axis=0)
            if m > pivot:  # NOTE: skips the noise and exps of a tile with no token above
                if USE_MASS and not USE_TOTAL:
                    above, total = _mass4(
                        above, total, x0, x1, x2, x3, pivot, row_max, inv_temp, False
                    )
                if FIND:
                    if m >= bound:
                        best_val, best_idx = _better4(
                            best_val, best_idx, x0, x1, x2, x3, base, pivot, bound,
                            temperature, seed, pos_lo, pos_hi, Q, USE_NOISE,
                        )  # fmt: skip
        else:
            if USE_MASS and not USE_TOTAL:
                above, total = _mass4(above, total, x0, x1, x2, x3, pivot, row_max, inv_temp, False)
            if FIND:
                best_val, best_idx = _better4(
                    best_val, best_idx, x0, x1, x2, x3, base, pivot, bound, temperature, seed,
                    pos_lo, pos_hi, Q, USE_NOISE,
                )  # fmt: skip
    m = tl.max(best_val, axis=0)
    idx = tl.min(tl.where(best_val == m, best_idx, BIG_IDX), axis=0)
    return m, idx, tl.max(lane_max, axis=0), tl.sum(above, axis=0), tl.sum(total, axis=0)


@triton.jit
def _noise_key(seeds_ptr, positions_ptr, row):
    seed = tl.load(seeds_ptr + row)
    pos = tl.load(positions_ptr + row).to(tl.uint64)
    return seed, (pos & 0xFFFFFFFF).to(tl.uint32), (pos >> 32).to(tl.uint32)


@triton.jit
def _first_kernel(
    part_f_ptr,  # [R + 1, num_seqs, num_chunks, 4] fp32; writes launch 0: (score, max x, -, -)
    part_i_ptr,  # [R + 1, num_seqs, num_chunks] int32; writes launch 0: token
    logits_ptr,  # [num_seqs, vocab_size] fp32
    temperatures_ptr,  # [num_seqs] fp32, 0 = greedy
    seeds_ptr,  # [num_seqs] int64
    positions_ptr,  # [num_seqs] int64
    vocab_size,
    stride_logits_row,
    num_chunks,
    CHUNK: tl.constexpr,
    Q: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_logits_row
    temperature = tl.load(temperatures_ptr + row)
    ninf = float("-inf")
    if temperature == 0.0:  # greedy: argmax, first index on ties
        val, idx, x_max, _, _ = _scan_chunk(
            row_ptr, chunk * CHUNK, vocab_size, temperature, ninf, ninf, 0.0, 0, 0, 0,
            CHUNK, Q, False, True, True, False, False, False,
        )  # fmt: skip
    else:
        seed, pos_lo, pos_hi = _noise_key(seeds_ptr, positions_ptr, row)
        val, idx, x_max, _, _ = _scan_chunk(
            row_ptr, chunk * CHUNK, vocab_size, temperature, ninf, ninf, 0.0, seed, pos_lo,
            pos_hi, CHUNK, Q, True, True, True, False, False, False,
        )  # fmt: skip
    out = part_f_ptr + (row * num_chunks + chunk) * 4
    tl.store(out, val)
    tl.store(out + 1, x_max)
    tl.store(part_i_ptr + row * num_chunks + chunk, idx)


@triton.jit
def _best_of_chunks(part_f_ptr, part_i_ptr, base, num_chunks, live, CHUNKS_BLOCK: tl.constexpr):
    """The launch's best (score, token) of a row from its chunk partials: the draw's reduce."""
    c = tl.arange(0, CHUNKS_BLOCK)
    ok = c < tl.where(live, num_chunks, 0)  # a dead row reads nothing
    vals = tl.load(part_f_ptr + (base + c) * 4, mask=ok, other=float("-inf"))
    idx = tl.load(part_i_ptr + base + c, mask=ok, other=BIG_IDX)
    m = tl.max(vals, axis=0)
    best = tl.min(tl.where(vals == m, idx, BIG_IDX), axis=0)
    return tl.where(best == BIG_IDX, 0, best)  # no chunk: token 0, like the draw


@triton.jit
def _chunk_sum(part_f_ptr, base, num_chunks, field, live, CHUNKS_BLOCK: tl.constexpr):
    c = tl.arange(0, CHUNKS_BLOCK)
    ok = c < tl.where(live, num_chunks, 0)  # a dead row reads nothing
    return tl.sum(tl.load(part_f_ptr + (base + c) * 4 + field, mask=ok, other=0.0), axis=0)


@triton.jit
def _row_state(
    part_f_ptr,
    part_i_ptr,
    state_f_ptr,  # [R + 1, num_seqs, 4] fp32: x_c, row_max, total, bound
    state_i_ptr,  # [R + 1, num_seqs, 2] int32: done, candidate (the token once done)
    logits_ptr,
    temperatures_ptr,
    top_p_ptr,
    min_p_ptr,
    row,
    launch,  # the launch this state opens: 1 .. R + 1; reads launch - 1's partials
    num_seqs,
    num_chunks,
    stride_logits_row,
    CHUNKS_BLOCK: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    PREV: tl.constexpr,  # the kind of launch - 1: FIRST, TEST, SEARCH or BOTH
):
    """(done, candidate, x_c, row_max, total, bound, temperature, top_p) of a row as a launch
    starts: the candidate the previous launch tested accepted, or replaced by the one it found.
    Every program of a launch redoes this (num_chunks partials), so none reads what another of
    its launch writes."""
    temperature = tl.load(temperatures_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    base = ((launch - 1) * num_seqs + row) * num_chunks
    row_ptr = logits_ptr + row * stride_logits_row
    everything = row >= 0
    if PREV == FIRST:  # from the first pass: the candidate over all tokens, untested
        c = tl.arange(0, CHUNKS_BLOCK)
        maxes = tl.load(part_f_ptr + (base + c) * 4 + 1, mask=c < num_chunks, other=float("-inf"))
        row_max = tl.max(maxes, axis=0)
        cand = _best_of_chunks(part_f_ptr, part_i_ptr, base, num_chunks, everything, CHUNKS_BLOCK)
        x_c = tl.load(row_ptr + cand)
        total = 0.0 * row_max
        done = temperature == 0.0  # greedy: the argmax
    else:
        sf = state_f_ptr + ((launch - 1) * num_seqs + row) * 4
        si = state_i_ptr + ((launch - 1) * num_seqs + row) * 2
        x_c = tl.load(sf)
        row_max = tl.load(sf + 1)
        done = tl.load(si) != 0
        cand = tl.load(si + 1)
        total = tl.load(sf + 2)
        if PREV == TEST:  # the first test summed every token; later states carry the total
            total = _chunk_sum(part_f_ptr, base, num_chunks, 2, ~done, CHUNKS_BLOCK)
    bound = tl.full([], float("-inf"), tl.float32)
    if USE_MIN_P:
        # the threshold path's bound, the same expression: p_i >= min_p * p_max
        min_p = tl.load(min_p_ptr + row)
        if (min_p > 0.0) & (temperature > 0.0):
            bound = row_max + temperature * tl.log(min_p)
    if PREV == TEST or PREV == BOTH:  # the last launch summed the mass above the candidate
        above = _chunk_sum(part_f_ptr, base, num_chunks, 1, ~done, CHUNKS_BLOCK)
        in_nucleus = (x_c >= bound) & ((top_p >= 1.0) | (above < top_p * total))
        rejected = (~done) & (~in_nucleus)
        done = done | in_nucleus
        # after a TEST a rejected row keeps its candidate: the SEARCH's pivot
    if PREV == SEARCH:  # every undecided row moves on to the candidate it found
        rejected = ~done
    if PREV == SEARCH or PREV == BOTH:  # the next candidate, above the rejected one
        nxt = _best_of_chunks(part_f_ptr, part_i_ptr, base, num_chunks, rejected, CHUNKS_BLOCK)
        cand = tl.where(rejected, nxt, cand)
        x_c = tl.where(rejected, tl.load(row_ptr + cand), x_c)
    # without top-p, a candidate at or above min-p's bound needs no mass
    done = done | ((top_p >= 1.0) & (x_c >= bound))
    return done, cand, x_c, row_max, total, bound, temperature, top_p


@triton.jit(**runtime_args(ints=["num_seqs"]))
def _round_kernel(
    part_f_ptr,  # writes launch `launch`: (score, mass above the pivot, total (TEST), -)
    part_i_ptr,
    state_f_ptr,
    state_i_ptr,
    logits_ptr,
    temperatures_ptr,
    seeds_ptr,
    positions_ptr,
    top_p_ptr,  # [num_seqs] fp32, 1 = off
    min_p_ptr,  # [num_seqs] fp32, 0 = off (USE_MIN_P only)
    num_seqs,
    vocab_size,
    stride_logits_row,
    num_chunks,
    launch,  # 1 .. R + 1
    CHUNK: tl.constexpr,
    Q: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    PREV: tl.constexpr,  # the kind of launch - 1
    KIND: tl.constexpr,  # TEST, SEARCH or BOTH
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    done, cand, x_c, row_max, total, bound, temperature, top_p = _row_state(
        part_f_ptr, part_i_ptr, state_f_ptr, state_i_ptr, logits_ptr, temperatures_ptr,
        top_p_ptr, min_p_ptr, row, launch, num_seqs, num_chunks, stride_logits_row,
        CHUNKS_BLOCK, USE_MIN_P, PREV,
    )  # fmt: skip
    if chunk == 0:
        sf = state_f_ptr + (launch * num_seqs + row) * 4
        si = state_i_ptr + (launch * num_seqs + row) * 2
        tl.store(sf, x_c)
        tl.store(sf + 1, row_max)
        tl.store(sf + 2, total)
        tl.store(sf + 3, bound)
        tl.store(si, done.to(tl.int32))
        tl.store(si + 1, cand)
    if done.to(tl.int32) == 0:
        seed, pos_lo, pos_hi = _noise_key(seeds_ptr, positions_ptr, row)
        val, idx, _, above, chunk_total = _scan_chunk(
            logits_ptr + row * stride_logits_row, chunk * CHUNK, vocab_size, temperature, x_c,
            bound, row_max, seed, pos_lo, pos_hi, CHUNK, Q, True, KIND != TEST, False,
            KIND != SEARCH, KIND == TEST, KIND != TEST,
        )  # fmt: skip
        out = part_f_ptr + ((launch * num_seqs + row) * num_chunks + chunk) * 4
        tl.store(out, val)
        tl.store(out + 1, above)
        tl.store(out + 2, chunk_total)
        tl.store(part_i_ptr + (launch * num_seqs + row) * num_chunks + chunk, idx)


@triton.jit(**runtime_args(ints=["num_seqs"]))
def _final_kernel(
    out_ptr,  # [num_seqs] int64: the tokens of decided rows
    fallback_temps_ptr,  # [num_seqs] fp32: 0 for decided rows, else the row's temperature
    part_f_ptr,
    part_i_ptr,
    state_f_ptr,
    state_i_ptr,
    logits_ptr,
    temperatures_ptr,
    top_p_ptr,
    min_p_ptr,
    num_seqs,
    num_chunks,
    stride_logits_row,
    launch,  # after the last round
    CHUNKS_BLOCK: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    PREV: tl.constexpr,  # the kind of the last round
):
    row = tl.program_id(0).to(tl.int64)
    done, cand, x_c, row_max, total, bound, temperature, top_p = _row_state(
        part_f_ptr, part_i_ptr, state_f_ptr, state_i_ptr, logits_ptr, temperatures_ptr,
        top_p_ptr, min_p_ptr, row, launch, num_seqs, num_chunks, stride_logits_row,
        CHUNKS_BLOCK, USE_MIN_P, PREV,
    )  # fmt: skip
    tl.store(out_ptr + row, cand.to(tl.int64))
    tl.store(fallback_temps_ptr + row, tl.where(done, 0.0, temperature))


@triton.jit
def _fallback_draw_kernel(
    out_ptr,  # [num_seqs] int64
    logits_ptr,
    fallback_temps_ptr,  # [num_seqs] fp32: 0 = decided, skip
    thresholds_ptr,  # [num_seqs] fp32 from sampling_thresholds
    seeds_ptr,
    positions_ptr,
    vocab_size,
    stride_logits_row,
    ROW_CHUNK: tl.constexpr,  # the whole row, a multiple of 4 * Q
    Q: tl.constexpr,
):
    """The draw over {x >= threshold} for undecided rows, one program per row (rarely any)."""
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(fallback_temps_ptr + row)
    if temperature > 0.0:
        seed, pos_lo, pos_hi = _noise_key(seeds_ptr, positions_ptr, row)
        val, idx, _, _, _ = _scan_chunk(
            logits_ptr + row * stride_logits_row, 0, vocab_size, temperature, float("-inf"),
            tl.load(thresholds_ptr + row), 0.0, seed, pos_lo, pos_hi, ROW_CHUNK, Q, True, True,
            False, False, False, False,
        )  # fmt: skip
        tl.store(out_ptr + row, idx.to(tl.int64))


def sample_top_p(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32, penalties applied
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    seeds: torch.Tensor,  # [num_seqs] int64
    positions: torch.Tensor,  # [num_seqs] int64
    top_p: torch.Tensor,  # [num_seqs] fp32, 1 = off
    min_p: torch.Tensor | None = None,  # [num_seqs] fp32, 0 = off; None = no row uses it
    num_rounds: int = NUM_ROUNDS,
) -> torch.Tensor:  # [num_seqs] int64
    """The token kernels/sampling.py's threshold + draw path gives each row (top-p, min-p,
    plain and greedy rows mixed; no top-k), found by rejection. No host sync; R + 3 launches
    (R = num_rounds candidates tested), plus the fallback's passes_per_filter() + 3 launches of
    num_seqs programs."""
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1, (
        f"logits must be [num_seqs, vocab_size] float32, contiguous in vocab "
        f"(got {tuple(logits.shape)} {logits.dtype}, strides {logits.stride()})"
    )
    num_seqs, vocab_size = logits.shape
    for name, t, dtype in (
        ("temperatures", temperatures, torch.float32),
        ("seeds", seeds, torch.int64),
        ("positions", positions, torch.int64),
        ("top_p", top_p, torch.float32),
        ("min_p", min_p if min_p is not None else top_p, torch.float32),
    ):
        assert t.shape == (num_seqs,) and t.dtype == dtype and t.is_contiguous(), (
            f"{name} must be [num_seqs={num_seqs}] {dtype} contiguous "
            f"(got {tuple(t.shape)} {t.dtype})"
        )
    assert vocab_size < 2**31, "vocab_size must fit int32"
    assert num_rounds >= 1, f"num_rounds must be >= 1 (got {num_rounds})"
    dev = logits.device
    out = torch.empty(num_seqs, dtype=torch.int64, device=dev)
    if num_seqs == 0:
        return out
    row_chunk = triton.cdiv(vocab_size, 4 * Q) * 4 * Q  # the row, padded to the noise layout
    chunk = min(CHUNK, row_chunk)
    num_chunks = triton.cdiv(vocab_size, chunk)
    kinds = launch_kinds(num_rounds)
    launches = len(kinds) + 1
    # partials per launch (no double-buffering to reason about; 16 B per row and chunk)
    part_f = torch.empty(launches, num_seqs, num_chunks, 4, dtype=torch.float32, device=dev)
    part_i = torch.empty(launches, num_seqs, num_chunks, dtype=torch.int32, device=dev)
    state_f = torch.empty(launches, num_seqs, 4, dtype=torch.float32, device=dev)
    state_i = torch.empty(launches, num_seqs, 2, dtype=torch.int32, device=dev)
    fallback_temps = torch.empty(num_seqs, dtype=torch.float32, device=dev)
    min_p_col = min_p if min_p is not None else top_p  # a placeholder the kernels never read
    grid = (num_seqs, num_chunks)
    chunks_block = triton.next_power_of_2(num_chunks)
    _first_kernel[grid](
        part_f, part_i, logits, temperatures, seeds, positions, vocab_size, logits.stride(0),
        num_chunks, CHUNK=chunk, Q=Q, num_warps=NUM_WARPS,
    )  # fmt: skip
    prev = FIRST.value
    for launch, kind in enumerate(kinds, start=1):
        _round_kernel[grid](
            part_f, part_i, state_f, state_i, logits, temperatures, seeds, positions, top_p,
            min_p_col, num_seqs, vocab_size, logits.stride(0), num_chunks, launch,
            CHUNK=chunk, Q=Q, CHUNKS_BLOCK=chunks_block, USE_MIN_P=min_p is not None,
            PREV=prev, KIND=kind, num_warps=NUM_WARPS,
        )  # fmt: skip
        prev = kind
    _final_kernel[(num_seqs,)](
        out, fallback_temps, part_f, part_i, state_f, state_i, logits, temperatures, top_p,
        min_p_col, num_seqs, num_chunks, logits.stride(0), launches,
        CHUNKS_BLOCK=chunks_block, USE_MIN_P=min_p is not None, PREV=prev, num_warps=1,
    )  # fmt: skip
    # The exact path for rows still undecided, one split (one program) per row so that decided
    # rows cost num_seqs early exits per launch, not num_seqs x num_chunks.
    thresholds = sampling_thresholds(
        logits, fallback_temps, None, top_p, min_p, split_size=row_chunk
    )
    _fallback_draw_kernel[(num_seqs,)](
        out, logits, fallback_temps, thresholds, seeds, positions, vocab_size, logits.stride(0),
        ROW_CHUNK=row_chunk, Q=Q, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
