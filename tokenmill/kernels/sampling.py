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
kernels/threshold_search.py: a split-row search, no sort and no sync): token i may be drawn iff
logits[r, i] >= thresholds[r]. Division by T > 0 is monotonic, so the kept set is decided on
the raw logits.

Top-p without top-k (min-p allowed) skips the search: `sample` draws by rejection
(kernels/rejection_sampling.py). The draw over all tokens gives a candidate; one more pass sums
the mass above it: if it is in the nucleus it is the token the threshold path would draw (the
argmax over a superset that lies in the subset), else the argmax over the logits above it is
the next candidate. R + 3 launches over the logits (R = 4 candidates tested: at top_p 0.95 a
row is undecided after them with probability ~3e-7), then the threshold path as
a fallback for undecided rows, launched always (graph-safe) with one program per row that
exits at once for decided rows. Same tokens as the threshold path, except on rows whose cut
is within float32 rounding of top_p. TOKENMILL_TOPP_PATH=threshold (read at every call)
forces the threshold path; batches with top-k, or min-p alone, always take it (the reference
applies top-p among the top-k survivors).

Grid of the draw: (num_seqs, cdiv(vocab_size, CHUNK)). CHUNK = 8,192 tokens per program, so
vocab 151,936 x 256 rows is 4,864 programs of 32 KiB of logits each: enough in flight to stream
the 155 MB of logits near bandwidth. Each program leaves its best (value, token) per chunk; a
second kernel, one program per row, picks the best chunk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokenmill.kernels.threshold_search import sampling_thresholds

# The torch reference of the masks is the engine's CPU sampler; the kernels are tested against it.
__all__ = ["sample", "sample_tokens", "sampling_thresholds"]

Q = 256  # tokens per Philox output word per iteration; the noise layout depends on it
CHUNK = 8192  # tokens per program (a multiple of 4 * Q)
NUM_WARPS = 4


@triton.jit
def _gumbel_score(x, temperature, rand):
    """x / T + Gumbel noise from one Philox word; kernels/rejection_sampling.py draws with it
    too, so both paths score a token identically."""
    u = tl.uint_to_uniform_float(rand)  # [0, 1); u = 0 gives -inf, never drawn
    return x / temperature - tl.log(-tl.log(u))


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
        x = _gumbel_score(x, temperature, rand)
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


def topp_path() -> str:
    """TOKENMILL_TOPP_PATH: "reject" (the default) or "threshold", read at every call."""
    path = os.environ.get("TOKENMILL_TOPP_PATH", "reject")
    if path not in ("reject", "threshold"):
        raise ValueError(f"TOKENMILL_TOPP_PATH must be 'reject' or 'threshold' (got {path!r})")
    return path


def sample(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32, penalties applied
    temperatures: torch.Tensor,  # [num_seqs] fp32, 0 = greedy
    seeds: torch.Tensor,  # [num_seqs] int64
    positions: torch.Tensor,  # [num_seqs] int64
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs] int64
    """Pass None for a filter no row uses: with all three None, one pass over the vocab.

    Top-p without top-k goes by rejection (kernels/rejection_sampling.py), the same tokens as
    the threshold path's; TOKENMILL_TOPP_PATH=threshold forces the threshold path."""
    if top_p is not None and top_k is None and topp_path() == "reject":
        from tokenmill.kernels.rejection_sampling import sample_top_p  # it imports this module

        top_p = top_p.float().contiguous()
        min_p = min_p.float().contiguous() if min_p is not None else None
        return sample_top_p(logits, temperatures, seeds, positions, top_p, min_p)
    thresholds = None
    if top_k is not None or top_p is not None or min_p is not None:
        thresholds = sampling_thresholds(logits, temperatures, top_k, top_p, min_p)
    return sample_tokens(logits, temperatures, seeds, positions, thresholds)
