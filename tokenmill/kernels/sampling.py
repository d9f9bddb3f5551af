"""Token sampling on the device with no host sync: temperature, top-k, top-p, min-p, seeded noise.

One draw is Gumbel-max (the "exponential race"): token = argmax_i(logit_i / T + g_i) with
g_i = -log(-log(u_i)) picks token i with probability softmax(logits / T)_i. Temperature 0 rows
take argmax(logits) (the first index on ties, like torch.argmax).

u_i comes from Philox keyed by the row's seed with counter (token quad, position), so a row's
noise is a function of (seeds[r], positions[r], token id) only: a seeded request samples the same
tokens whatever else shares its batch. Each Philox call yields 4 words, used for 4 tokens
(Q apart), which makes the noise 4x cheaper than one call per token:

    iteration base b, Q = 256:  philox(counter = b/4 + j) -> tokens b + j, b+Q+j, b+2Q+j, b+3Q+j

Top-k / top-p / min-p become one per-row threshold on the raw logits (`sampling_thresholds`,
a second Triton kernel, no sort and no sync): token i may be drawn iff logits[r, i] >=
thresholds[r]. Division by T > 0 is monotonic, so the kept set is decided on the raw logits.

Grid of the draw: (num_seqs, cdiv(vocab_size, CHUNK)). CHUNK = 8,192 tokens per program, so
vocab 151,936 x 256 rows is 4,864 programs of 32 KiB of logits each: enough in flight to stream
the 155 MB of logits near bandwidth. Each program leaves its best (value, token) per chunk; a
second kernel, one program per row, picks the best chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The torch reference of the masks is the engine's CPU sampler; the kernels are tested against it.

Q = 256  # tokens per Philox output word per iteration; the noise layout depends on it
CHUNK = 8192  # tokens per program (a multiple of 4 * Q)
NUM_WARPS = 4


@triton.jit
def _consider(
    best_val,
    best_idx,
    row_ptr,
    idx,
    vocab_size,
    temperature,
    threshold,
    rand,
    USE_NOISE: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
):
    mask = idx < vocab_size
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf"))
    if USE_THRESHOLD:
        x = tl.where(x >= threshold, x, float("-inf"))
    if USE_NOISE:
        u = tl.uint_to_uniform_float(rand)  # [0, 1); u = 0 gives -inf, never drawn
        x = x / temperature - tl.log(-tl.log(u))
    # strict >: the earliest token wins ties within a lane (indices grow along the loop)
    better = x > best_val
    return tl.where(better, x, best_val), tl.where(better, idx, best_idx)


@triton.jit
def _scan(
    row_ptr,
    chunk_start,
    vocab_size,
    temperature,
    threshold,
    seed,
    pos_lo,
    pos_hi,
    CHUNK: tl.constexpr,
    Q: tl.constexpr,
    USE_NOISE: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
):
    offs = tl.arange(0, Q)
    best_val = tl.full([Q], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([Q], dtype=tl.int32)
    zero = tl.zeros([Q], dtype=tl.uint32)
    r0, r1, r2, r3 = zero, zero, zero, zero
    for it in range(0, CHUNK, 4 * Q):
        base = chunk_start + it
        if USE_NOISE:
            counter = (base // 4 + offs).to(tl.uint32)
            r0, r1, r2, r3 = tl.philox(seed, counter, zero + pos_lo, zero + pos_hi, zero)
        best_val, best_idx = _consider(
            best_val,
            best_idx,
            row_ptr,
            base + offs,
            vocab_size,
            temperature,
            threshold,
            r0,
            USE_NOISE,
            USE_THRESHOLD,
        )
        best_val, best_idx = _consider(
            best_val,
            best_idx,
            row_ptr,
            base + Q + offs,
            vocab_size,
            temperature,
            threshold,
            r1,
            USE_NOISE,
            USE_THRESHOLD,
        )
        best_val, best_idx = _consider(
            best_val,
            best_idx,
            row_ptr,
            base + 2 * Q + offs,
            vocab_size,
            temperature,
            threshold,
            r2,
            USE_NOISE,
            USE_THRESHOLD,
        )
        best_val, best_idx = _consider(
            best_val,
            best_idx,
            row_ptr,
            base + 3 * Q + offs,
            vocab_size,
            temperature,
            threshold,
            r3,
            USE_NOISE,
            USE_THRESHOLD,
        )
    return best_val, best_idx


@triton.jit
def _sample_chunk_kernel(
    part_val_ptr,  # [num_seqs, num_chunks] fp32
    part_idx_ptr,  # [num_seqs, num_chunks] int32
    logits_ptr,  # [num_seqs, vocab_size] fp32
    temperatures_ptr,  # [num_seqs] fp32, 0 = greedy
    thresholds_ptr,  # [num_seqs] fp32 (USE_THRESHOLD only)
    seeds_ptr,  # [num_seqs] int64
    positions_ptr,  # [num_seqs] int64
    vocab_size,
    stride_logits_row,
    num_chunks,
    CHUNK: tl.constexpr,
    Q: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_logits_row
    temperature = tl.load(temperatures_ptr + row)
    chunk_start = chunk * CHUNK
    if temperature == 0.0:
        best_val, best_idx = _scan(
            row_ptr, chunk_start, vocab_size, 1.0, 0.0, 0, 0, 0, CHUNK, Q, False, False
        )
    else:
        threshold = 0.0
        if USE_THRESHOLD:
            threshold = tl.load(thresholds_ptr + row)
        seed = tl.load(seeds_ptr + row)
        pos = tl.load(positions_ptr + row).to(tl.uint64)
        pos_lo = (pos & 0xFFFFFFFF).to(tl.uint32)
        pos_hi = (pos >> 32).to(tl.uint32)
        best_val, best_idx = _scan(
            row_ptr,
            chunk_start,
            vocab_size,
            temperature,
            threshold,
            seed,
            pos_lo,
            pos_hi,
            CHUNK,
            Q,
            True,
            USE_THRESHOLD,
        )
    m = tl.max(best_val, axis=0)
    idx = tl.min(tl.where(best_val == m, best_idx, 2147483647), axis=0)
    tl.store(part_val_ptr + row * num_chunks + chunk, m)
    tl.store(part_idx_ptr + row * num_chunks + chunk, idx)


@triton.jit
def _sample_reduce_kernel(
    out_ptr,  # [num_seqs] int64
    part_val_ptr,
    part_idx_ptr,
    num_chunks,
    CHUNKS_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_BLOCK)
    mask = offs < num_chunks
    vals = tl.load(part_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * num_chunks + offs, mask=mask, other=2147483647)
    m = tl.max(vals, axis=0)
    # all -inf (a row of -inf logits): the first chunk's token 0, not garbage
    best = tl.min(tl.where(vals == m, idx, 2147483647), axis=0)
    tl.store(out_ptr + row, best.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    seeds: torch.Tensor,  # [num_seqs] int64
    positions: torch.Tensor,  # [num_seqs] int64, e.g. the request's output index
    thresholds: torch.Tensor | None = None,  # [num_seqs] fp32 from sampling_thresholds
) -> torch.Tensor:  # [num_seqs] int64
    """One Gumbel-max draw per row; only tokens with logits >= thresholds[r] can be drawn."""
    assert logits.dim() == 2 and logits.dtype == torch.float32, (
        f"logits must be [num_seqs, vocab_size] float32 (got {tuple(logits.shape)} {logits.dtype})"
    )
    assert logits.stride(1) == 1, "logits must be contiguous in vocab; call .contiguous()"
    num_seqs, vocab_size = logits.shape
    for name, t, dtype in (
        ("temperatures", temperatures, torch.float32),
        ("seeds", seeds, torch.int64),
        ("positions", positions, torch.int64),
    ):
        assert t.shape == (num_seqs,) and t.dtype == dtype and t.is_contiguous(), (
            f"{name} must be [num_seqs={num_seqs}] {dtype} contiguous "
            f"(got {tuple(t.shape)} {t.dtype})"
        )
    if thresholds is not None:
        assert thresholds.shape == (num_seqs,) and thresholds.dtype == torch.float32
        assert thresholds.is_contiguous()
    assert vocab_size < 2**31, "vocab_size must fit int32"
    out = torch.empty(num_seqs, dtype=torch.int64, device=logits.device)
    if num_seqs == 0:
        return out
    chunk = min(CHUNK, triton.cdiv(vocab_size, 4 * Q) * 4 * Q)
    num_chunks = triton.cdiv(vocab_size, chunk)
    part_val = torch.empty(num_seqs, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(num_seqs, num_chunks, dtype=torch.int32, device=logits.device)
    _sample_chunk_kernel[(num_seqs, num_chunks)](
        part_val,
        part_idx,
        logits,
        temperatures,
        thresholds if thresholds is not None else temperatures,
        seeds,
        positions,
        vocab_size,
        logits.stride(0),
        num_chunks,
        CHUNK=chunk,
        Q=Q,
        USE_THRESHOLD=thresholds is not None,
        num_warps=NUM_WARPS,
    )
    _sample_reduce_kernel[(num_seqs,)](
        out, part_val, part_idx, num_chunks, CHUNKS_BLOCK=triton.next_power_of_2(num_chunks)
    )
    return out


# Threshold search. NUM_PIVOTS pivots per pass split the remaining key interval 17 ways, so the
# 2^32 float32 keys shrink to one in at most 8 passes over the row (vs a full sort); a search
# stops sooner, as soon as the kept set is decided (see _largest_key_reaching). Each pass
# compares a [NUM_PIVOTS, BLOCK] tile: 16 pivots keep the compare/add work near the cost of
# streaming the row (608 KB for vocab 151,936), more pivots would make the pass compute-bound.
NUM_PIVOTS = 16
BLOCK = 512
THRESHOLD_NUM_WARPS = 8


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (-inf lowest): flip the magnitude bits of negatives.

    Its own inverse on the bits: _key(_key(x)) has x's bits back.
    """
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_key(k):
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _sum_at_least(
    row_ptr,
    vocab_size,
    pivots,  # [NUM_PIVOTS] int64 keys
    row_max,
    inv_temp,
    USE_MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
):
    """Per pivot: (softmax mass unnormalised, or count) and count of tokens with key >= pivot."""
    piv = pivots.to(tl.int32)
    mass = tl.zeros([NUM_PIVOTS], dtype=tl.float32)
    count = tl.zeros([NUM_PIVOTS], dtype=tl.float32)  # exact below 2^24 tokens
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        # padding is -inf: its key is below every pivot (pivots are > the lowest key)
        x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
        at_least = _key(x)[None, :] >= piv[:, None]  # [NUM_PIVOTS, BLOCK]
        count += tl.sum(at_least.to(tl.float32), axis=1)
        if USE_MASS:
            w = tl.exp((x - row_max) * inv_temp)
            mass += tl.sum(tl.where(at_least, w[None, :], 0.0), axis=1)
    if USE_MASS:
        return mass, count
    return count, count


@triton.jit
def _count_at(pivots, counts, key, known):
    """The count at `key` if it is one of the pivots, else `known` (the bound did not move)."""
    c = tl.max(tl.where(pivots == key, counts, -1.0), axis=0)
    return tl.where(c < 0.0, known, c)


@triton.jit
def _largest_key_reaching(
    row_ptr,
    vocab_size,
    lo,  # int64 key with sum_at_least(lo) >= target
    hi,  # int64 key with sum_at_least(hi) < target
    count_lo,  # tokens with key >= lo, or an upper bound of it
    count_hi,  # tokens with key >= hi
    target,
    row_max,
    inv_temp,
    USE_MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
):
    """A key lo whose tokens at or above it are exactly {x : sum_at_least(x) >= target}.

    Invariant lo < hi, sum(lo) >= target > sum(hi); each pass moves lo up to the largest pivot
    that still reaches the target and hi down to the next pivot above it. The set {key >= lo}
    is decided, and the search stops, once [lo, hi) holds one token (it is the threshold token;
    no token lies between lo and it), once hi = lo + 1 (lo is the threshold token's key, ties
    included), or for a count target k once exactly k tokens are >= lo. Worked example, keys
    [7, 3, 9, 5], count target 2 (top-2): lo 3 (count 4), hi 10 (count 0) -> ... -> lo 6
    (count 2): stop, {key >= 6} = {7, 9}. Returns (lo, tokens >= lo).
    """
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    count_hi = count_hi + tl.zeros([], dtype=tl.float32)  # a tensor, as the loop makes it
    go = (hi - lo > 1) & (count_lo - count_hi > 1)
    if not USE_MASS:
        go = go & (count_lo != target)
    while go:
        # j * (hi - lo) // 17 for j in 1..16: in [lo, hi), at least one > lo when hi - lo >= 2
        pivots = lo + ((hi - lo) * j) // (NUM_PIVOTS + 1)
        sums, counts = _sum_at_least(
            row_ptr, vocab_size, pivots, row_max, inv_temp, USE_MASS, BLOCK, NUM_PIVOTS
        )
        reaches = sums >= target
        new_lo = tl.max(tl.where(reaches, pivots, lo), axis=0)
        # the nearest failing pivot above new_lo (robust to rounding making sums non-monotone)
        new_hi = tl.min(tl.where((~reaches) & (pivots > new_lo), pivots, hi), axis=0)
        count_lo = _count_at(pivots, counts, new_lo, count_lo)
        count_hi = _count_at(pivots, counts, new_hi, count_hi)
        lo, hi = new_lo, new_hi
        go = (hi - lo > 1) & (count_lo - count_hi > 1)
        if not USE_MASS:
            go = go & (count_lo != target)
    return lo, count_lo


@triton.jit
def _thresholds_kernel(
    thresholds_ptr,  # [num_seqs] fp32 out
    logits_ptr,  # [num_seqs, vocab_size] fp32
    temperatures_ptr,  # [num_seqs] fp32, 0 = greedy
    top_k_ptr,  # [num_seqs] int64, <= 0 = off (USE_TOP_K only)
    top_p_ptr,  # [num_seqs] fp32, 1 = off (USE_TOP_P only)
    min_p_ptr,  # [num_seqs] fp32, 0 = off (USE_MIN_P only)
    vocab_size,
    stride_logits_row,
    USE_TOP_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    temperature = tl.load(temperatures_ptr + row)
    threshold = tl.full([], float("-inf"), tl.float32)  # a tensor: both if-branches agree
    if temperature > 0.0:  # greedy rows draw argmax whatever the threshold
        inv_temp = 1.0 / temperature
        # one pass: the row's max and (top-p) sum of exp((x - max) / T), online as in softmax
        lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
            new_max = tl.maximum(lane_max, x)
            if USE_TOP_P:
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # no -inf - -inf
                lane_sum = lane_sum * tl.exp((lane_max - ref) * inv_temp) + tl.exp(
                    (x - ref) * inv_temp
                )
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        row_sum = tl.sum(lane_sum * tl.exp((lane_max - row_max) * inv_temp), axis=0)
        lo = _key(tl.full([], float("-inf"), tl.float32)).to(tl.int64)  # every token reaches it
        hi = _key(row_max).to(tl.int64) + 1  # no token reaches it
        count_lo = vocab_size.to(tl.float32)
        k_active = False
        if USE_TOP_K:
            k = tl.load(top_k_ptr + row)
            k_active = (k > 0) & (k < vocab_size)
            if k_active:
                lo, count_lo = _largest_key_reaching(
                    row_ptr, vocab_size, lo, hi, count_lo, 0.0, k.to(tl.float32), row_max,
                    inv_temp, False, BLOCK, NUM_PIVOTS,
                )  # fmt: skip
        if USE_TOP_P:
            top_p = tl.load(top_p_ptr + row)
            if top_p < 1.0:
                # mass of the top-k survivors; top-p keeps a prefix of them reaching top_p of it
                mass = row_sum
                if k_active:
                    survivors = tl.full([NUM_PIVOTS], 0, tl.int64) + lo
                    masses, _ = _sum_at_least(
                        row_ptr, vocab_size, survivors, row_max, inv_temp, True, BLOCK, NUM_PIVOTS
                    )
                    mass = tl.max(masses, axis=0)
                # Tokens below row_max + T * log((1 - top_p) / vocab_size) hold under 1 - top_p
                # of the mass together (each under (1 - top_p) / vocab_size of it): the
                # threshold is above them. 1% of slack for rounding.
                floor = row_max + temperature * (tl.log((1.0 - top_p) / vocab_size) - 0.01)
                floor_key = _key(floor).to(tl.int64)
                count_lo = tl.where(floor_key > lo, vocab_size.to(tl.float32), count_lo)
                lo = tl.maximum(lo, floor_key)
                lo, count_lo = _largest_key_reaching(
                    row_ptr, vocab_size, lo, hi, count_lo, 0.0, top_p * mass, row_max,
                    inv_temp, True, BLOCK, NUM_PIVOTS,
                )  # fmt: skip
        threshold = _from_key(lo)
        if USE_MIN_P:
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + T * log(min_p)
            min_p = tl.load(min_p_ptr + row)
            if min_p > 0.0:
                threshold = tl.maximum(threshold, row_max + temperature * tl.log(min_p))
    tl.store(thresholds_ptr + row, threshold)


def sampling_thresholds(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32, raw (not divided by temperature)
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    top_k: torch.Tensor | None = None,  # [num_seqs] int, <= 0 = off; None = no row uses it
    top_p: torch.Tensor | None = None,  # [num_seqs] fp32, 1 = off
    min_p: torch.Tensor | None = None,  # [num_seqs] fp32, 0 = off
) -> torch.Tensor:  # [num_seqs] fp32: keep token i iff logits[r, i] >= thresholds[r]
    """Per-row logit threshold equal to the engine's torch mask (the reference it is tested
    against: `tokenmill.engine.sampler.top_k_top_p_min_p_mask`), found without sorting.

    top-k keeps the k largest logits; top-p the largest logits (among the top-k survivors) whose
    softmax(logits / T) mass, with the token where it first reaches top_p, is at least top_p of
    theirs; both by a 17-way search over float32 keys (<= 8 passes each, usually fewer), after
    one pass for the row's max and softmax sum. min-p is logit_max + T * log(min_p). The
    threshold is a value between the last kept logit and the next one down, not necessarily a
    logit itself. Greedy rows get -inf. No host sync.

    NOTE: ties at the threshold are all kept (the sorted reference keeps an arbitrary subset).
    """
    num_seqs, vocab_size = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (
        f"logits must be [num_seqs, vocab_size] float32, contiguous in vocab "
        f"(got {logits.dtype}, strides {logits.stride()})"
    )
    assert temperatures.shape == (num_seqs,) and temperatures.dtype == torch.float32

    def column(t, dtype, name):
        if t is None:
            return temperatures  # a placeholder the kernel never reads
        assert t.shape == (num_seqs,), f"{name} must be [num_seqs={num_seqs}] (got {t.shape})"
        return t.to(dtype).contiguous()

    thresholds = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return thresholds
    _thresholds_kernel[(num_seqs,)](
        thresholds,
        logits,
        temperatures.contiguous(),
        column(top_k, torch.int64, "top_k"),
        column(top_p, torch.float32, "top_p"),
        column(min_p, torch.float32, "min_p"),
        vocab_size,
        logits.stride(0),
        USE_TOP_K=top_k is not None,
        USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None,
        BLOCK=BLOCK,
        NUM_PIVOTS=NUM_PIVOTS,
        num_warps=THRESHOLD_NUM_WARPS,
    )
    return thresholds


def sample(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32, penalties applied
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    seeds: torch.Tensor,  # [num_seqs] int64
    positions: torch.Tensor,  # [num_seqs] int64
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs] int64
    """Pass None for a filter no row uses: with all three None, one pass over the vocab."""
    thresholds = None
    if top_k is not None or top_p is not None or min_p is not None:
        thresholds = sampling_thresholds(logits, temperatures, top_k, top_p, min_p)
    return sample_tokens(logits, temperatures, seeds, positions, thresholds)
