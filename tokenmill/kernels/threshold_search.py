"""Sort-free top-k / top-p / min-p: one logit threshold per row, found by a split-row search.

Token i of row r may be drawn iff logits[r, i] >= thresholds[r]. The threshold equals the kept
set of the engine's sorted torch mask (`engine/torch_draw.py: top_k_top_p_min_p_mask`, the one
reference): top-k keeps the k largest logits; top-p, among the top-k survivors, the largest
logits whose softmax(logits / T) mass, with the token where it first reaches top_p, is at least
top_p of the survivors' mass; min-p is logit_max + T * log(min_p). Ties at the threshold are all
kept (the sorted reference keeps an arbitrary subset of them).

The search runs over int32 keys of the float32 logits (same order, -inf lowest, `_key`), on a
bracket [lo, hi) per row with invariant  S(lo) >= target > S(hi),  S(x) = count (top-k) or
mass (top-p) of the tokens with key >= x. Each pass evaluates S at NUM_PIVOTS pivots inside the
bracket and moves lo up to the largest pivot that reaches the target, hi down to the next pivot
above it; then it snaps [lo, hi) to [smallest, largest + 1) of the keys the pass saw in the
bracket (same sums: no token lies in between), which ends ties at the threshold at once. A row
is done once [lo, hi) holds at most one token, once hi = lo + 1, or (top-k) once exactly k
tokens are >= lo; then {key >= lo} is the kept set. top-k runs first; top-p then searches its
survivors from a floor below which they hold under 1 - top_p of their mass.

Launches (no host sync, a fixed number for a given set of filters, so a CUDA graph can hold
them; rows that finish early exit at once in the remaining passes):

    _stats_kernel        (num_seqs, num_splits)  per split: max, sum exp((x - max) / T), min
    _pass_kernel x N     (num_seqs, num_splits)  narrow the bracket from the previous
                                                  partials, then per split and pivot:
                                                  (mass, count) of in-bracket tokens >= pivot,
                                                  and the in-bracket key extent
    _finish_kernel       (num_seqs,)             last narrow, threshold, min-p

The narrow step is tiny (num_splits x NUM_PIVOTS partials), so every program of a row redoes it
instead of a separate reduce launch; program 0 writes the row's state. State and partials are
double-buffered by pass parity: pass i reads slot (i - 1) % 2 and writes slot i % 2, so no
program reads what another program of the same launch writes.

Compaction: once every split of a row holds at most CAPACITY tokens in the bracket (known
exactly from the per-split counts at the new bounds), the next pass also copies them, in split
order, into the row's [num_splits, CAPACITY] candidate buffer (GATHER), and later passes read
only those (COMPACT): on flat rows (random weights: top-p 0.95 keeps most of the vocabulary) two
passes over the full row bring 152k tokens to ~1.7k, and the remaining passes cost little.
Copying in split order keeps the sums, hence the threshold, the same on every run.

Why these sizes (an H200 streams 4.8 TB/s; 256 rows x 151,936 logits are 155 MB, ~40 us a
pass): a full pass is compute-bound (a compare, a select, an add and an FMA per token and
pivot), so the pivots per pass trade passes against work per pass. NUM_PIVOTS = 16 = 8 value
pivots + 8 key pivots. Value pivots split [lo, hi) evenly in logit value (bounded below by the
row's finite min): on flat rows the in-bracket count drops 5-10x a pass (73k, 16k, 1.7k, 190,
20, 2 in a float64 emulation at 151,936), on peaked ones 1-3 passes suffice. Key pivots split
it evenly in key space, which guarantees the bracket shrinks at least 9x a pass whatever the
values (value pivots alone can stall on keys packed near 0.0): 11 passes cover all 2^32 keys,
so N = 11 per filter in use (top-k, top-p) makes every row exact. Tokens outside [lo, hi) add
nothing to the per-pivot sums (those >= hi are known from the previous pass: count_hi,
mass_hi), so a BLOCK with no token in the bracket skips the pivot work: on peaked rows passes
after the first cost about one read of the row. A split is SPLIT_SIZE = 8,192 tokens (32 KiB),
the draw kernel's chunk: 19 programs per row at vocab 151,936, so 64 rows already make 1,216
programs (9 per SM) and 256 rows 4,864. The split size does not depend on the batch: a row's
float sums, hence its threshold, are the same whatever shares its batch. benchmarks/
bench_sampling.py times the pivot splits (4+4, 8+8, 16+16, 12+4) on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.specialize import runtime_args

NUM_VALUE_PIVOTS = 8
NUM_KEY_PIVOTS = 8
BLOCK = 256  # tokens per tile; a [NUM_PIVOTS, BLOCK] tile of accumulators is 32 regs a thread
NUM_WARPS = 4
SPLIT_SIZE = 8192  # tokens per program: 19 programs per row at vocab 151,936
CAPACITY = 1024  # in-bracket tokens a split gathers at most (1/8 of it; 80 MB at 1,024 rows)

# Row state, double-buffered: int64 [2, num_seqs, 4] = (phase, lo, hi, mode) with phase 0 top-k,
# 1 top-p, 2 done and mode 0 FULL, 1 GATHER, 2 COMPACT; fp32 [2, num_seqs, 8] = f = (count_lo,
# count_hi, mass_lo, mass_hi, target, row_max, row_min, row_sum). Masses are relative to the row
# max's exp((x - max) / T) = 1; count_lo / mass_lo may be upper bounds after top-p's floor.


def passes_per_filter(num_key_pivots: int = NUM_KEY_PIVOTS) -> int:
    """Passes after which key pivots alone have shrunk any int32 key bracket to width 1."""
    width, passes = 2**32, 0
    while width > 1:
        width = -(-width // (num_key_pivots + 1))
        passes += 1
    return passes


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (-inf lowest): flip the magnitude bits of negatives."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_key(k):
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, row_min, NUM_VALUE_PIVOTS: tl.constexpr, NUM_KEY_PIVOTS: tl.constexpr):
    """[NUM_PIVOTS] int64 keys in (lo, hi): value pivots first, then key pivots."""
    j = tl.arange(0, NUM_VALUE_PIVOTS + NUM_KEY_PIVOTS)
    lo_v = tl.maximum(_from_key(lo), row_min)  # lo may be -inf's key: start at the finite min
    hi_v = _from_key(hi)
    frac = (j + 1).to(tl.float32) / (NUM_VALUE_PIVOTS + 1)
    by_value = _key(lo_v + (hi_v - lo_v) * frac).to(tl.int64)
    jk = (j - NUM_VALUE_PIVOTS + 1).to(tl.int64)
    by_key = lo + ((hi - lo) * jk) // (NUM_KEY_PIVOTS + 1)
    piv = tl.where(j < NUM_VALUE_PIVOTS, by_value, by_key)
    # a pivot at lo or hi says nothing new; inf / nan values land here too
    return tl.minimum(tl.maximum(piv, lo + 1), hi - 1)


@triton.jit
def _at(pivots, values, key, known):
    """values at the pivot equal to `key`, else `known` (that bound did not move)."""
    v = tl.max(tl.where(pivots == key, values, -1.0), axis=0)
    return tl.where(v < 0.0, known, v)


@triton.jit
def _is_done(lo, hi, count_lo, count_hi):
    """At most one token in [lo, hi): {key >= lo} is the kept set."""
    return (hi - lo <= 1) | (count_lo - count_hi <= 1.0)


@triton.jit
def _enter_top_p(phase, lo, hi, f, top_p, temperature):
    """After top-k (or at the start): start the top-p search on the survivors, or finish.

    f = (count_lo, count_hi, mass_lo, mass_hi, target, row_max, row_min, row_sum); mass_lo is
    the survivors' mass (all tokens >= lo).
    """
    count_lo, count_hi, mass_lo, mass_hi, target, row_max, row_min, row_sum = f
    start = (phase != 2) & (top_p < 1.0)
    # The survivors below row_max + T * log((1 - top_p) * mass_lo / count_lo) hold under
    # 1 - top_p of their mass together (at most count_lo tokens, each under (1 - top_p) *
    # mass_lo / count_lo, the max token weighing 1): the threshold is above them. On flat rows
    # mass_lo is large and the bracket starts close to the threshold. 1% of slack for rounding.
    floor = row_max + temperature * (tl.log((1.0 - top_p) * mass_lo / count_lo) - 0.01)
    floor_key = _key(floor).to(tl.int64)
    new_lo = tl.where(start, tl.maximum(lo, floor_key), lo)
    new_hi = tl.where(start, _key(row_max).to(tl.int64) + 1, hi)
    new_count_hi = tl.where(start, 0.0, count_hi)  # count_lo stays an upper bound of S(new_lo)
    new_mass_hi = tl.where(start, 0.0, mass_hi)
    new_target = tl.where(start, top_p * mass_lo, target)
    done = _is_done(new_lo, new_hi, count_lo, new_count_hi)
    new_phase = tl.where(start & ~done, 1, 2)
    f = (count_lo, new_count_hi, mass_lo, new_mass_hi, new_target, row_max, row_min, row_sum)
    return new_phase, new_lo, new_hi, f


@triton.jit
def _row_params(row, temperatures_ptr, top_k_ptr, top_p_ptr, vocab_size, USE_TOP_K, USE_TOP_P):
    temperature = tl.load(temperatures_ptr + row)
    k = tl.zeros([], tl.int64)
    if USE_TOP_K:
        k = tl.load(top_k_ptr + row)
    top_p = tl.full([], 1.0, tl.float32)
    if USE_TOP_P:
        top_p = tl.load(top_p_ptr + row)
    k_active = (k > 0) & (k < vocab_size)
    return temperature, k, k_active, top_p


@triton.jit
def _init_state(
    stats_ptr,  # [num_seqs, num_splits, 3] fp32: max, sum exp((x - max) / T), finite min
    row,
    num_splits,
    temperature,
    k,
    k_active,
    top_p,
    vocab_size,
    SPLITS_BLOCK: tl.constexpr,
):
    s = tl.arange(0, SPLITS_BLOCK)
    ok = s < num_splits
    base = stats_ptr + (row * num_splits + s) * 3
    maxes = tl.load(base, mask=ok, other=float("-inf"))
    sums = tl.load(base + 1, mask=ok, other=0.0)
    mins = tl.load(base + 2, mask=ok, other=float("inf"))
    row_max = tl.max(maxes, axis=0)
    inv_temp = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    scale = tl.where(maxes == float("-inf"), 0.0, tl.exp((maxes - row_max) * inv_temp))
    row_sum = tl.sum(sums * scale, axis=0)
    row_min = tl.min(mins, axis=0)
    lo = _key(tl.full([], float("-inf"), tl.float32)).to(tl.int64)  # every token is >= it
    hi = _key(row_max).to(tl.int64) + 1  # no token is >= it
    count_lo = vocab_size.to(tl.float32)
    target = k.to(tl.float32)
    f = (count_lo, 0.0 * count_lo, row_sum, 0.0 * row_sum, target, row_max, row_min, row_sum)
    k_done = (~k_active) | _is_done(lo, hi, count_lo, 0.0 * count_lo)
    # top-p starts now unless top-k runs first
    p_phase, p_lo, p_hi, p_f = _enter_top_p(
        tl.where(temperature > 0.0, 1, 2), lo, hi, f, top_p, temperature
    )
    phase = tl.where(k_done, p_phase, 0)
    phase = tl.where(temperature > 0.0, phase, 2)  # greedy rows: done, threshold -inf
    lo = tl.where(k_done, p_lo, lo)
    hi = tl.where(k_done, p_hi, hi)
    f = _select(k_done, p_f, f)
    return phase, lo, hi, f


@triton.jit
def _select(cond, a, b):
    return (
        tl.where(cond, a[0], b[0]),
        tl.where(cond, a[1], b[1]),
        tl.where(cond, a[2], b[2]),
        tl.where(cond, a[3], b[3]),
        tl.where(cond, a[4], b[4]),
        tl.where(cond, a[5], b[5]),
        tl.where(cond, a[6], b[6]),
        tl.where(cond, a[7], b[7]),
    )


@triton.jit
def _load_state(state_i_ptr, state_f_ptr, slot, row, num_seqs):
    ip = state_i_ptr + (slot * num_seqs + row) * 4
    fp = state_f_ptr + (slot * num_seqs + row) * 8
    f = (
        tl.load(fp + 0),
        tl.load(fp + 1),
        tl.load(fp + 2),
        tl.load(fp + 3),
        tl.load(fp + 4),
        tl.load(fp + 5),
        tl.load(fp + 6),
        tl.load(fp + 7),
    )
    return (
        tl.load(ip).to(tl.int32),
        tl.load(ip + 3).to(tl.int32),
        tl.load(ip + 1),
        tl.load(ip + 2),
        f,
    )


@triton.jit
def _store_state(state_i_ptr, state_f_ptr, slot, row, num_seqs, phase, mode, lo, hi, f):
    ip = state_i_ptr + (slot * num_seqs + row) * 4
    fp = state_f_ptr + (slot * num_seqs + row) * 8
    tl.store(ip, phase.to(tl.int64))
    tl.store(ip + 3, mode.to(tl.int64))
    tl.store(ip + 1, lo)
    tl.store(ip + 2, hi)
    tl.store(fp + 0, f[0])
    tl.store(fp + 1, f[1])
    tl.store(fp + 2, f[2])
    tl.store(fp + 3, f[3])
    tl.store(fp + 4, f[4])
    tl.store(fp + 5, f[5])
    tl.store(fp + 6, f[6])
    tl.store(fp + 7, f[7])


@triton.jit
def _narrow(
    partials_ptr,  # [2, num_seqs, num_splits, 2, NUM_PIVOTS] fp32: mass, count per pivot
    extents_ptr,  # [2, num_seqs, num_splits, 2] int32: min, max key in the bracket
    slot,
    row,
    num_seqs,
    num_splits,
    phase,
    mode,
    lo,
    hi,
    f,
    top_p,
    temperature,
    capacity,
    SPLITS_BLOCK: tl.constexpr,
    NUM_VALUE_PIVOTS: tl.constexpr,
    NUM_KEY_PIVOTS: tl.constexpr,
):
    """One search step of a searching row from the per-split sums of the last pass.

    Also picks the next pass's mode: a FULL row whose bracket holds at most `capacity` tokens
    in every split GATHERs them (while it passes over its splits once more), then reads only
    them (COMPACT). Per split, the bracket's tokens are its in-bracket count at new_lo minus
    that at new_hi (0 when hi did not move); when lo did not move it is unknown: stay FULL.
    """
    NUM_PIVOTS: tl.constexpr = NUM_VALUE_PIVOTS + NUM_KEY_PIVOTS
    count_lo, count_hi, mass_lo, mass_hi, target, row_max, row_min, row_sum = f
    pivots = _pivots(lo, hi, row_min, NUM_VALUE_PIVOTS, NUM_KEY_PIVOTS)
    s = tl.arange(0, SPLITS_BLOCK)[:, None]
    p = tl.arange(0, NUM_PIVOTS)[None, :]
    base = partials_ptr + ((slot * num_seqs + row) * num_splits + s) * (2 * NUM_PIVOTS) + p
    ok = s < num_splits
    masses = mass_hi + tl.sum(tl.load(base, mask=ok, other=0.0), axis=0)  # [NUM_PIVOTS]
    split_counts = tl.load(base + NUM_PIVOTS, mask=ok, other=0.0)  # [SPLITS_BLOCK, NUM_PIVOTS]
    counts = count_hi + tl.sum(split_counts, axis=0)
    reaches = tl.where(phase == 1, masses, counts) >= target
    new_lo = tl.max(tl.where(reaches, pivots, lo), axis=0)
    # the nearest failing pivot above new_lo (robust to rounding making sums non-monotone)
    new_hi = tl.min(tl.where((~reaches) & (pivots > new_lo), pivots, hi), axis=0)
    count_lo = _at(pivots, counts, new_lo, count_lo)
    mass_lo = _at(pivots, masses, new_lo, mass_lo)
    count_hi = _at(pivots, counts, new_hi, count_hi)
    mass_hi = _at(pivots, masses, new_hi, mass_hi)
    f = (count_lo, count_hi, mass_lo, mass_hi, target, row_max, row_min, row_sum)
    at_lo = pivots[None, :] == new_lo
    in_split = tl.max(tl.where(at_lo, split_counts, 0.0), axis=1) - tl.max(
        tl.where(pivots[None, :] == new_hi, split_counts, 0.0), axis=1
    )  # [SPLITS_BLOCK]
    lo_moved = tl.max((pivots == new_lo).to(tl.int32), axis=0) > 0
    fits = lo_moved & (tl.max(in_split, axis=0) <= capacity)
    new_mode = tl.where(mode == 1, 2, mode)  # a gathering pass is followed by compact ones
    new_mode = tl.where((mode == 0) & fits, 1, new_mode)
    # Snap to the data: no token lies between lo and the bracket's smallest key, nor between
    # its largest key and hi, so [min, max + 1) has the same sums. Ties at the threshold
    # (common: bf16 logits) end here with hi = lo + 1 instead of a key search down to width 1.
    sp = tl.arange(0, SPLITS_BLOCK)
    ext = extents_ptr + ((slot * num_seqs + row) * num_splits + sp) * 2
    key_min = tl.min(tl.load(ext, mask=sp < num_splits, other=2147483647), axis=0)
    key_max = tl.max(tl.load(ext + 1, mask=sp < num_splits, other=-2147483648), axis=0)
    snap = key_min.to(tl.int64) <= key_max.to(tl.int64)  # not an empty bracket
    new_lo = tl.where(snap, tl.maximum(new_lo, key_min.to(tl.int64)), new_lo)
    new_hi = tl.where(snap, tl.minimum(new_hi, key_max.to(tl.int64) + 1), new_hi)
    new_hi = tl.maximum(new_hi, new_lo + 1)
    done = _is_done(new_lo, new_hi, count_lo, count_hi) | ((phase == 0) & (count_lo == target))
    # a finished top-k search hands its survivors (mass_lo) to top-p
    p_phase, p_lo, p_hi, p_f = _enter_top_p(phase, new_lo, new_hi, f, top_p, temperature)
    to_p = done & (phase == 0)
    new_phase = tl.where(done, 2, phase)
    new_phase = tl.where(to_p, p_phase, new_phase)
    new_lo = tl.where(to_p, p_lo, new_lo)
    new_hi = tl.where(to_p, p_hi, new_hi)
    new_mode = tl.where(to_p, 0, new_mode)  # top-p's bracket is wider than what was gathered
    return new_phase, new_mode, new_lo, new_hi, _select(to_p, p_f, f)


@triton.jit
def _current_state(
    row, partials_ptr, extents_ptr, state_i_ptr, state_f_ptr, stats_ptr, temperatures_ptr,
    top_k_ptr, top_p_ptr, num_seqs, vocab_size, num_splits, capacity, slot,
    FIRST: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr, NUM_VALUE_PIVOTS: tl.constexpr, NUM_KEY_PIVOTS: tl.constexpr,
):  # fmt: skip
    """A row's search state as this launch starts: made from the stats on the first pass, else
    the previous launch's state narrowed by its partials (every program of a launch redoes this
    tiny reduction, so no program reads what another of the same launch writes)."""
    temperature, k, k_active, top_p = _row_params(
        row, temperatures_ptr, top_k_ptr, top_p_ptr, vocab_size, USE_TOP_K, USE_TOP_P
    )
    mode = tl.zeros([], tl.int32)  # 0 FULL, 1 GATHER, 2 COMPACT
    if FIRST:
        phase, lo, hi, f = _init_state(
            stats_ptr, row, num_splits, temperature, k, k_active, top_p, vocab_size, SPLITS_BLOCK
        )
    else:
        phase, mode, lo, hi, f = _load_state(state_i_ptr, state_f_ptr, 1 - slot, row, num_seqs)
        if phase != 2:
            phase, mode, lo, hi, f = _narrow(
                partials_ptr, extents_ptr, 1 - slot, row, num_seqs, num_splits, phase, mode, lo,
                hi, f, top_p, temperature, capacity, SPLITS_BLOCK, NUM_VALUE_PIVOTS,
                NUM_KEY_PIVOTS,
            )  # fmt: skip
    return temperature, top_p, phase, mode, lo, hi, f


@triton.jit
def _stats_kernel(
    stats_ptr,  # [num_seqs, num_splits, 3] fp32 out
    logits_ptr,  # [num_seqs, vocab_size] fp32
    temperatures_ptr,  # [num_seqs] fp32, 0 = greedy
    vocab_size,
    stride_logits_row,
    split_size,
    num_splits,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_logits_row
    temperature = tl.load(temperatures_ptr + row)
    inv_temp = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
    lane_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    start = split * split_size
    if temperature > 0.0:  # greedy rows need no threshold
        for off in range(start, start + split_size, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
            new_max = tl.maximum(lane_max, x)
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # no -inf - -inf
            lane_sum = lane_sum * tl.exp((lane_max - ref) * inv_temp) + tl.exp((x - ref) * inv_temp)
            lane_max = new_max
            lane_min = tl.minimum(lane_min, tl.where(x == float("-inf"), float("inf"), x))
    m = tl.max(lane_max, axis=0)
    ref = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(lane_sum * tl.exp((lane_max - ref) * inv_temp), axis=0)
    out = stats_ptr + (row * num_splits + split) * 3
    tl.store(out, m)
    tl.store(out + 1, total)
    tl.store(out + 2, tl.min(lane_min, axis=0))


@triton.jit(**runtime_args(ints=["num_seqs"]))
def _pass_kernel(
    partials_ptr,  # [2, num_seqs, num_splits, 2, NUM_PIVOTS] fp32
    extents_ptr,  # [2, num_seqs, num_splits, 2] int32
    state_i_ptr,  # [2, num_seqs, 4] int64
    state_f_ptr,  # [2, num_seqs, 8] fp32
    stats_ptr,  # [num_seqs, num_splits, 3] fp32 (FIRST only)
    candidates_ptr,  # [num_seqs, num_splits, capacity] fp32: gathered in-bracket logits
    num_candidates_ptr,  # [num_seqs, num_splits] int32
    logits_ptr,  # [num_seqs, vocab_size] fp32
    temperatures_ptr,  # [num_seqs] fp32
    top_k_ptr,  # [num_seqs] int64 (USE_TOP_K only)
    top_p_ptr,  # [num_seqs] fp32 (USE_TOP_P only)
    num_seqs,
    vocab_size,
    stride_logits_row,
    split_size,
    num_splits,
    capacity,
    slot,  # this pass writes slot; the previous one wrote 1 - slot
    FIRST: tl.constexpr,
    USE_TOP_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,
    NUM_VALUE_PIVOTS: tl.constexpr,
    NUM_KEY_PIVOTS: tl.constexpr,
):
    NUM_PIVOTS: tl.constexpr = NUM_VALUE_PIVOTS + NUM_KEY_PIVOTS
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature, top_p, phase, mode, lo, hi, f = _current_state(
        row, partials_ptr, extents_ptr, state_i_ptr, state_f_ptr, stats_ptr, temperatures_ptr,
        top_k_ptr, top_p_ptr, num_seqs, vocab_size, num_splits, capacity, slot, FIRST, USE_TOP_K,
        USE_TOP_P, SPLITS_BLOCK, NUM_VALUE_PIVOTS, NUM_KEY_PIVOTS,
    )  # fmt: skip
    if split == 0:
        _store_state(state_i_ptr, state_f_ptr, slot, row, num_seqs, phase, mode, lo, hi, f)
    if phase != 2:
        row_max = f[5]
        inv_temp = 1.0 / temperature
        pivots = _pivots(lo, hi, f[6], NUM_VALUE_PIVOTS, NUM_KEY_PIVOTS).to(tl.int32)
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        mass = tl.zeros([NUM_PIVOTS, BLOCK], dtype=tl.float32)
        count = tl.zeros([NUM_PIVOTS, BLOCK], dtype=tl.float32)  # exact below 2^24 tokens
        # this program's tokens: its split of the row, or what it gathered from it
        region = candidates_ptr + (row * num_splits + split) * capacity
        src = logits_ptr + row * stride_logits_row + split * split_size
        n = tl.minimum(split_size, vocab_size - split * split_size)
        if mode == 2:
            src = region
            n = tl.load(num_candidates_ptr + row * num_splits + split)
        num_gathered = tl.zeros([], tl.int32)
        key_min = tl.full([], 2147483647, tl.int32)  # of the tokens in [lo, hi)
        key_max = tl.full([], -2147483648, tl.int32)
        for off in range(0, n, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            ok = offs < n
            x = tl.load(src + offs, mask=ok, other=float("-inf"))
            keys = _key(x)
            # tokens >= hi are in count_hi / mass_hi already; below lo they add nothing
            keys = tl.where(ok & (keys < hi32), keys, -2147483648)
            tile_max = tl.max(keys, axis=0)
            if tile_max >= lo32:  # NOTE: skips the pivot work of a bracket-free tile
                key_max = tl.maximum(key_max, tile_max)
                key_min = tl.minimum(key_min, tl.min(tl.where(keys >= lo32, keys, 2147483647), 0))
                if mode == 1:  # in split order: the same candidates (and sums) on every run
                    in_bracket = (keys >= lo32).to(tl.int32)
                    at = num_gathered + tl.cumsum(in_bracket, axis=0) - 1
                    tl.store(region + at, x, mask=in_bracket > 0)
                    num_gathered += tl.sum(in_bracket, axis=0)
                # [NUM_PIVOTS, BLOCK] 1.0 / 0.0: a compare, a select, an add and (top-p) an FMA
                # per token and pivot
                at_least = (keys[None, :] >= pivots[:, None]).to(tl.float32)
                count += at_least
                if USE_TOP_P:  # top-p's search, and top-k's survivors' mass for it
                    w = tl.exp((x - row_max) * inv_temp)  # <= 1; 0 for -inf
                    mass += at_least * w[None, :]
        if mode == 1:
            tl.store(num_candidates_ptr + row * num_splits + split, num_gathered)
        ext = extents_ptr + ((slot * num_seqs + row) * num_splits + split) * 2
        tl.store(ext, key_min)
        tl.store(ext + 1, key_max)
        out = partials_ptr + ((slot * num_seqs + row) * num_splits + split) * (2 * NUM_PIVOTS)
        p = tl.arange(0, NUM_PIVOTS)
        tl.store(out + p, tl.sum(mass, axis=1))
        tl.store(out + NUM_PIVOTS + p, tl.sum(count, axis=1))


@triton.jit(**runtime_args(ints=["num_seqs"]))
def _finish_kernel(
    thresholds_ptr,  # [num_seqs] fp32 out
    partials_ptr,
    extents_ptr,
    state_i_ptr,
    state_f_ptr,
    stats_ptr,
    temperatures_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,  # [num_seqs] fp32 (USE_MIN_P only)
    num_seqs,
    vocab_size,
    num_splits,
    capacity,
    slot,  # the last pass wrote 1 - slot
    FIRST: tl.constexpr,  # no search pass ran (min-p only)
    USE_TOP_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,
    NUM_VALUE_PIVOTS: tl.constexpr,
    NUM_KEY_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature, top_p, phase, mode, lo, hi, f = _current_state(
        row, partials_ptr, extents_ptr, state_i_ptr, state_f_ptr, stats_ptr, temperatures_ptr,
        top_k_ptr, top_p_ptr, num_seqs, vocab_size, num_splits, capacity, slot, FIRST, USE_TOP_K,
        USE_TOP_P, SPLITS_BLOCK, NUM_VALUE_PIVOTS, NUM_KEY_PIVOTS,
    )  # fmt: skip
    # a row still searching here (impossible with passes_per_filter passes) keeps a superset
    threshold = _from_key(lo)
    if USE_MIN_P:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + T * log(min_p)
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0.0:
            threshold = tl.maximum(threshold, f[5] + temperature * tl.log(min_p))
    threshold = tl.where(temperature > 0.0, threshold, float("-inf"))
    tl.store(thresholds_ptr + row, threshold)


def sampling_thresholds(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32, raw (not divided by temperature)
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    top_k: torch.Tensor | None = None,  # [num_seqs] int, <= 0 = off; None = no row uses it
    top_p: torch.Tensor | None = None,  # [num_seqs] fp32, 1 = off
    min_p: torch.Tensor | None = None,  # [num_seqs] fp32, 0 = off
    split_size: int = SPLIT_SIZE,  # tokens per program, a multiple of block
    capacity: int = CAPACITY,  # in-bracket tokens a split may gather
    block: int = BLOCK,
    num_passes: int | None = None,  # search passes; None = enough for exactness
) -> torch.Tensor:  # [num_seqs] fp32: keep token i iff logits[r, i] >= thresholds[r]
    """Per-row logit threshold equal to the engine's torch mask, found without sorting.

    Greedy rows get -inf (their draw is argmax). No host sync; 2 + N launches, N =
    passes_per_filter() for each of top-k and top-p in use. A row's threshold depends on its
    own logits and parameters only (the splits do not depend on the batch), so a seeded
    request samples the same tokens whatever shares its batch.
    """
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1, (
        f"logits must be [num_seqs, vocab_size] float32, contiguous in vocab "
        f"(got {tuple(logits.shape)} {logits.dtype}, strides {logits.stride()})"
    )
    num_seqs, vocab_size = logits.shape
    assert vocab_size < 2**24, "counts are float32 sums: vocab_size must be below 2^24"
    assert temperatures.shape == (num_seqs,) and temperatures.dtype == torch.float32, (
        f"temperatures must be [num_seqs={num_seqs}] float32 "
        f"(got {tuple(temperatures.shape)} {temperatures.dtype})"
    )
    assert split_size % block == 0, f"split_size ({split_size}) must be a multiple of {block}"
    temperatures = temperatures.contiguous()

    def column(t, dtype, name):
        if t is None:
            return temperatures  # a placeholder the kernels never read
        assert t.shape == (num_seqs,), f"{name} must be [num_seqs={num_seqs}] (got {t.shape})"
        return t.to(dtype).contiguous()

    dev = logits.device
    thresholds = torch.empty(num_seqs, dtype=torch.float32, device=dev)
    if num_seqs == 0:
        return thresholds
    split_size = min(split_size, triton.cdiv(vocab_size, block) * block)
    num_splits = triton.cdiv(vocab_size, split_size)
    if num_passes is None:
        num_passes = passes_per_filter(NUM_KEY_PIVOTS) * ((top_k is not None) + (top_p is not None))
    num_pivots = NUM_VALUE_PIVOTS + NUM_KEY_PIVOTS
    stats = torch.empty(num_seqs, num_splits, 3, dtype=torch.float32, device=dev)
    partials = torch.empty(2, num_seqs, num_splits, 2, num_pivots, dtype=torch.float32, device=dev)
    extents = torch.empty(2, num_seqs, num_splits, 2, dtype=torch.int32, device=dev)
    state_i = torch.empty(2, num_seqs, 4, dtype=torch.int64, device=dev)
    state_f = torch.empty(2, num_seqs, 8, dtype=torch.float32, device=dev)
    capacity = min(capacity, split_size)
    candidates = torch.empty(num_seqs, num_splits, capacity, dtype=torch.float32, device=dev)
    num_candidates = torch.empty(num_seqs, num_splits, dtype=torch.int32, device=dev)
    top_k_col = column(top_k, torch.int64, "top_k")
    top_p_col = column(top_p, torch.float32, "top_p")
    flags = dict(USE_TOP_K=top_k is not None, USE_TOP_P=top_p is not None)
    sizes = dict(
        SPLITS_BLOCK=triton.next_power_of_2(num_splits),
        NUM_VALUE_PIVOTS=NUM_VALUE_PIVOTS,
        NUM_KEY_PIVOTS=NUM_KEY_PIVOTS,
    )
    grid = (num_seqs, num_splits)
    _stats_kernel[grid](
        stats, logits, temperatures, vocab_size, logits.stride(0), split_size, num_splits,
        BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    for i in range(num_passes):
        _pass_kernel[grid](
            partials, extents, state_i, state_f, stats, candidates, num_candidates, logits,
            temperatures, top_k_col, top_p_col, num_seqs, vocab_size, logits.stride(0),
            split_size, num_splits, capacity, i % 2,
            FIRST=i == 0, BLOCK=block, **flags, **sizes, num_warps=NUM_WARPS,
        )  # fmt: skip
    _finish_kernel[(num_seqs,)](
        thresholds, partials, extents, state_i, state_f, stats, temperatures, top_k_col, top_p_col,
        column(min_p, torch.float32, "min_p"), num_seqs, vocab_size, num_splits, capacity,
        num_passes % 2, FIRST=num_passes == 0, USE_MIN_P=min_p is not None, **flags, **sizes,
        num_warps=1,
    )  # fmt: skip
    return thresholds
