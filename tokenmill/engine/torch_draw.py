"""The torch draw (CPU, and a GPU without the Triton kernels): top-k / top-p / min-p without
sorting the vocabulary, and noise only where a token may be drawn.

The reference (`top_k_top_p_min_p_mask`, below; the Triton kernels' too) sorts every row:
1.3 ms a row at 49,152 tokens on a CPU core; and the exponential-race noise hashed every
(row, token) pair: as much again. With SmolLM2 on a 2-core CPU, `--temperature 0.8 --top-p
0.95` took 1.8x the time of greedy. Here:

  1. top-k and top-p need only the head of the sorted row: `topk(K)` gives the K largest
     logits in order (K = 256, or the largest top-k asked); top-k's threshold is the k-th of
     them. top-p walks the head's mass under the softmax of the whole row (its normaliser is
     one pass, not a sort) until the mass before a token reaches top_p; that token's
     predecessor is the last kept. A row whose cut lies beyond the head (a flat distribution,
     such as a random-weight model's) falls back to the reference for that row alone.
  2. min-p is a threshold on the kept softmax (as in the reference).
  3. Ties at a threshold are all kept, as in the reference: the kept set equals it, up to the
     float rounding of the mass sums (a sorted row sums in another order).
  4. The exponential race `argmax(probs / E)` needs E only where a token can still beat the
     most likely token's ratio: the same hash of (row seed, output index, token id) as
     `exponential_noise`, evaluated there only, so a row draws the same token as with the
     noise of its whole row.
"""

from __future__ import annotations

import torch

_MASK = float("-inf")
HEAD = 256  # logits read in order per row; top-p cuts of real models fall well inside


def top_k_top_p_min_p_mask(
    logits: torch.Tensor,  # [num_seqs, vocab_size], already divided by temperature
    top_k: torch.Tensor,  # [num_seqs] int, -1 = off
    top_p: torch.Tensor,  # [num_seqs] float, 1 = off
    min_p: torch.Tensor,  # [num_seqs] float, 0 = off
) -> torch.Tensor:  # [num_seqs, vocab_size] bool, True = token may be sampled
    """Reference masks: top-k, then top-p on the renormalised survivors, then min-p.

    Each filter is a threshold on the logits, so tokens tied with the last one kept are kept
    too (as vLLM's sorted reference does for top-k, and as the sort-free kernel does): with
    bf16 logits, ties at the k-th value are common, and which of them a sort puts first is
    arbitrary."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # [num_seqs, 1]
    keep_sorted = sorted_logits >= kth
    sorted_logits = sorted_logits.masked_fill(~keep_sorted, _MASK)
    probs = sorted_logits.softmax(dim=-1)
    # keep a token while the mass strictly before it is below top_p (the first always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # 1 = off, exactly
    last = sorted_logits.masked_fill(~(keep_sorted & keep_p), float("inf")).amin(-1, keepdim=True)
    keep_sorted &= sorted_logits >= last  # ties with the last token top-p keeps stay too
    probs = sorted_logits.masked_fill(~keep_sorted, _MASK).softmax(dim=-1)
    keep_sorted &= probs >= min_p[:, None] * probs[:, :1]
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep


def head_top_k_top_p_min_p_mask(
    logits: torch.Tensor,  # [num_seqs, vocab_size], already divided by temperature
    top_k: torch.Tensor,  # [num_seqs] int, -1 = off
    top_p: torch.Tensor,  # [num_seqs] float, 1 = off
    min_p: torch.Tensor,  # [num_seqs] float, 0 = off
    head: int = HEAD,
) -> torch.Tensor:  # [num_seqs, vocab_size] bool, True = token may be sampled
    """The kept set of top_k_top_p_min_p_mask, from the head of each row."""
    num_seqs, vocab_size = logits.shape
    k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)  # [num_seqs]
    use_k = k < vocab_size
    size = min(vocab_size, max(head, int(k[use_k].max()) if bool(use_k.any()) else 0))
    vals, _ = logits.topk(size, dim=-1)  # [num_seqs, size], descending
    # top-k: the k-th largest logit; rows without top-k keep everything
    kth = vals.gather(1, (k.clamp(max=size) - 1)[:, None])  # [num_seqs, 1]
    kth = torch.where(use_k[:, None], kth, torch.full_like(kth, _MASK))
    # top-p over the top-k survivors, whose softmax normaliser is one pass over the row
    m = vals[:, :1]  # [num_seqs, 1] row max
    survivors = logits >= kth
    z = torch.where(survivors, (logits - m).exp(), 0.0).sum(-1, keepdim=True)  # [num_seqs, 1]
    probs = torch.where(vals >= kth, (vals - m).exp() / z, 0.0)  # [num_seqs, size]
    mass_before = probs.cumsum(-1) - probs
    use_p = top_p < 1.0
    cut = mass_before >= top_p[:, None]  # [num_seqs, size]: not kept by top-p
    found = cut.any(-1)
    first = cut.int().argmax(-1)  # [num_seqs] first position not kept (>= 1: top_p > 0)
    last = vals.gather(1, (first - 1).clamp(min=0)[:, None])  # [num_seqs, 1]
    threshold = torch.where((use_p & found)[:, None], torch.maximum(last, kth), kth)
    keep = logits >= threshold  # [num_seqs, vocab_size]
    # min-p on the kept softmax: p >= min_p * p_max
    use_min = min_p > 0
    if bool(use_min.any()):
        kept_probs = torch.where(keep, logits, _MASK).softmax(-1)
        p_max = kept_probs.amax(-1, keepdim=True)
        keep &= ~use_min[:, None] | (kept_probs >= min_p[:, None] * p_max)
    beyond = (use_p & ~found).nonzero().flatten()
    if beyond.numel():  # the cut lies past the head: the sorted reference for those rows
        keep[beyond] = top_k_top_p_min_p_mask(
            logits[beyond], top_k[beyond], top_p[beyond], min_p[beyond]
        )
    return keep


ARGMAX_CHUNK = 1024  # columns per chunk in row_argmax


def row_argmax(x: torch.Tensor) -> torch.Tensor:  # [num_rows] int64
    """x.argmax(dim=-1) of a [num_rows, vocab_size] tensor, the same indices (the first of tied
    maxima, NaN counting as the maximum), 5-6x faster on CPU.

    NOTE: on CPU (torch 2.13) argmax is a scalar loop: 31 ms for 256 rows x 49,152 float32 on
    one core where amax takes 3. So: amax of each 1,024-column chunk, the first chunk holding
    the row's maximum (argmax over ~50 values), then argmax inside that chunk alone. On CUDA
    torch's own argmax is used."""
    num_rows, vocab_size = x.shape
    num_chunks = vocab_size // ARGMAX_CHUNK
    if x.is_cuda or num_chunks < 2:
        return x.argmax(dim=-1)
    whole = num_chunks * ARGMAX_CHUNK
    chunk_max = x[:, :whole].reshape(num_rows, num_chunks, ARGMAX_CHUNK).amax(-1)
    if whole < vocab_size:  # the tail shorter than a chunk, as one more chunk
        chunk_max = torch.cat([chunk_max, x[:, whole:].amax(-1, keepdim=True)], dim=1)
    first = chunk_max.argmax(dim=-1)  # [num_rows] first chunk holding the max (NaN included)
    cols = first[:, None] * ARGMAX_CHUNK + torch.arange(ARGMAX_CHUNK, device=x.device)
    inside = x.gather(1, cols.clamp(max=vocab_size - 1)).argmax(dim=-1)
    # clamped tail columns repeat the last column: never before the first maximum
    return first * ARGMAX_CHUNK + inside


# The smallest noise open_uniform allows: -log(1 - 2**-24) = 5.96e-8 in float32; a little
# under it, so that no token that could win is ever left out.
NOISE_FLOOR = 5.9e-8


def exponential_race(
    probs: torch.Tensor,  # [num_seqs, vocab_size] float32, 0 where a token may not be drawn
    seeds: list[int],
    positions: list[int],
) -> torch.Tensor:  # [num_seqs] int64
    """argmax(probs / E) with E = exponential_noise(seeds, positions), hashing E only where a
    token can still win.

    The most likely token's ratio r = probs[top] / E[top] is a lower bound of the winner's;
    a token with probs < r * NOISE_FLOOR stays below r whatever its noise, so only the others
    need theirs: the kept tokens of a top-p row, and of a plain temperature row the few
    hundred a trained model does not rule out. The winner, ties included, is the dense one."""
    num_seqs = probs.shape[0]
    every = torch.arange(num_seqs, device=probs.device)
    top = row_argmax(probs)  # [num_seqs]
    bound = probs[every, top] / noise_at(seeds, positions, every, top)  # [num_seqs]
    rows, cols = (probs >= (bound * NOISE_FLOOR)[:, None]).nonzero(as_tuple=True)
    ratio = torch.zeros_like(probs)
    ratio[rows, cols] = probs[rows, cols] / noise_at(seeds, positions, rows, cols)
    return row_argmax(ratio)


def noise_seed(seed: int, position: int) -> int:
    """The RNG seed of one draw: a function of (request seed, output index) only."""
    return (seed * 0x9E3779B1 + position * 0x85EBCA77 + 0x165667B1) % (2**63 - 1)


_M32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def exponential_noise(
    seeds: list[int], positions: list[int], vocab_size: int, device: torch.device
) -> torch.Tensor:  # [num_seqs, vocab_size] float32
    """Exp(1) noise from a counter-based hash of (row seed, output index, vocab index).

    Pure integer arithmetic, so it is the same on every device and independent of the batch.
    """
    hi, lo = _row_keys(seeds, positions, device)
    idx = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return _noise(idx[None, :], hi[:, None], lo[:, None])


def noise_at(
    seeds: list[int],
    positions: list[int],
    rows: torch.Tensor,  # [num_points] int64 row of each point
    cols: torch.Tensor,  # [num_points] int64 vocab index of each point
) -> torch.Tensor:  # [num_points] float32
    """exponential_noise(seeds, positions, ...)[rows, cols], hashing only those points."""
    hi, lo = _row_keys(seeds, positions, rows.device)
    return _noise(cols, hi[rows], lo[rows])


def _row_keys(seeds: list[int], positions: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    mixed = [noise_seed(s, p) for s, p in zip(seeds, positions)]
    hi = torch.tensor([(m >> 32) & _M32 for m in mixed], dtype=torch.int64, device=device)
    lo = torch.tensor([m & _M32 for m in mixed], dtype=torch.int64, device=device)
    return hi, lo  # [num_seqs] each


def _noise(idx: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    x = _lowbias32(idx ^ hi)
    x = _lowbias32((x + lo) & _M32)
    return -torch.log(open_uniform(x))


def open_uniform(x: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1), both ends excluded, from uint32 hashes (int64 tensor): the top 23
    bits plus half a step, which float32 holds exactly up to 1 - 2**-24.

    NOTE: with 24 bits, (2**24 - 1 + 0.5) / 2**24 rounds to 1.0 in float32: the noise -log(1)
    was 0, a masked token's 0 / 0 a NaN, and argmax picks NaN, so about one row in 340 at a
    49k vocabulary drew a token outside its top-p set or its grammar's mask."""
    return ((x >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
