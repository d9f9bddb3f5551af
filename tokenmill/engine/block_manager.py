"""Paged KV-cache bookkeeping in plain integers: free list, block tables, refcounts, prefix cache.

Block b holds the K/V of block_size consecutive tokens of one or more sequences. A request's
block_ids list is its block table: token at position p lives in block block_ids[p // block_size]
at offset p % block_size, i.e. in cache slot block_ids[p // block_size] * block_size + p % bs.

Prefix caching: a block that is full gets a hash of (previous block's hash, its tokens). A new
request whose first full prompt blocks have the same hashes shares those blocks (refcount + 1)
instead of recomputing them. A freed block keeps its hash and stays reusable until the free
list hands it out for something else (least recently freed first).

Sliding window W (every layer of the model slides, Mistral v0.1 style): a query at position p
reads keys in (p - W, p] only. Once a request has computed c tokens, its next query sits at
>= c, so keys at positions <= c - W are never read again and every block wholly below
c - W + 1 goes back to the free list while the request runs. Its table entry becomes
FREED_BLOCK (the table stays positional: position p is still entry p // block_size):

    W = 8, block_size = 4, c = 17:  keys 0..9 are dead, blocks 0 and 1 (keys 0..7) are freed
    block_ids = [FREED, FREED, 7, 2, 5]      num_freed_blocks = 2

so a long request holds about W / block_size + 2 blocks whatever its length. A freed block
stays a prefix-cache entry like any other free block. Models that interleave global layers
(Gemma 2/3, Qwen2 with max_window_layers) share one block table across all layers, and the
global layers read every key: nothing can be freed there, so they pass sliding_window=None.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.engine.request import Request

FREED_BLOCK = -1  # a block-table entry whose block the sliding window has left behind


def _block_hash(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Allocates KV blocks to requests. No torch: the model runner turns ids into slots."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None (got {sliding_window})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # The window every layer attends within (None: some layer reads every key).
        self.sliding_window = sliding_window
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        # Free blocks, oldest-freed first; a free block may still be a prefix-cache entry.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # Per request: how many of its blocks are hashed (full and registered), and the hash
        # of the last of them (its block may be freed and reused since: keep the hash here).
        self.num_hashed: dict[str, int] = {}
        self.last_hash: dict[str, int | None] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        """Whether req's block table can grow to cover num_tokens tokens (freed entries count
        as covered: only blocks from the window's start on are ever held)."""
        return self.blocks_needed(num_tokens) - len(req.block_ids) <= len(self.free)

    def num_tokens_fitting(self, req: Request) -> int:
        """The most tokens req's table can cover with the blocks free now."""
        return (len(req.block_ids) + len(self.free)) * self.block_size

    def num_live_blocks(self, req: Request) -> int:
        """Blocks req holds (its table minus the entries the window freed)."""
        return len(req.block_ids) - req.num_freed_blocks

    def max_blocks_held(self, num_tokens: int) -> int:
        """The fewest blocks a request of num_tokens tokens must hold at once to run to the end:
        all of them, or with a sliding window the blocks one window spans plus the one the next
        token lands in (the scheduler then shrinks its chunks to what the free blocks hold)."""
        need = self.blocks_needed(num_tokens)
        if self.sliding_window is None:
            return need
        # W - 1 keys before the newest token, at worst starting at a block's last slot
        return min(need, self.blocks_needed(self.sliding_window - 1) + 1)

    def num_freeable_blocks(self, req: Request) -> int:
        """Leading blocks of req that no future query of req can read (see the module doc)."""
        if self.sliding_window is None:
            return 0
        first_needed = req.num_computed_tokens - self.sliding_window + 1  # first key still read
        return max(0, first_needed) // self.block_size

    # ---- allocation --------------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Attach cached blocks of req's leading full blocks; return tokens they cover.

        At least one prompt token is always left to compute, so the step that finishes the
        prompt has logits to sample from.
        """
        assert not req.block_ids and req.num_computed_tokens == 0
        self.num_hashed[req.req_id] = 0
        # the chain starts from the request's salt: different salts never share a block
        self.last_hash[req.req_id] = None if req.cache_salt is None else hash(req.cache_salt)
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        tokens = req.token_ids(0, req.num_tokens)
        max_blocks = (len(tokens) - 1) // self.block_size
        self.prefix_queries += len(req.prompt_token_ids)
        parent = self.last_hash[req.req_id]
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = _block_hash(parent, chunk)
            b = self.cached.get(h)
            if b is None or self.block_tokens[b] != chunk:
                break
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            req.block_ids.append(b)
            parent = h
        self.num_hashed[req.req_id] = len(req.block_ids)
        self.last_hash[req.req_id] = parent
        num_cached = len(req.block_ids) * self.block_size
        self.prefix_hits += min(num_cached, len(req.prompt_token_ids))
        return num_cached

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow req's block table to cover num_tokens tokens (caller checked can_allocate)."""
        need = self.blocks_needed(num_tokens) - len(req.block_ids)
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict the stale prefix-cache entry
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
                self.block_tokens[b] = None
            self.ref_counts[b] = 1
            req.block_ids.append(b)

    def register_full_blocks(self, req: Request) -> None:
        """Hash req's blocks that are now full of computed tokens, so others can share them."""
        if not self.enable_prefix_caching:
            return
        done = self.num_hashed.get(req.req_id, 0)
        known = min(req.num_computed_tokens, req.num_tokens)  # in-flight tokens are unknown
        num_full = min(known // self.block_size, len(req.block_ids))
        if num_full <= done:
            return
        parent = self.last_hash.get(req.req_id)
        for i in range(done, num_full):
            b = req.block_ids[i]
            chunk = tuple(req.token_ids(i * self.block_size, (i + 1) * self.block_size))
            h = _block_hash(parent, chunk)
            # A block the window freed before it could be hashed only extends the chain.
            if b != FREED_BLOCK and self.block_hash[b] is None:
                self.block_hash[b] = h
                self.block_tokens[b] = chunk
                self.cached.setdefault(h, b)
            parent = h
        self.num_hashed[req.req_id] = num_full
        self.last_hash[req.req_id] = parent

    def free_outside_window(self, req: Request) -> int:
        """Free req's leading blocks that the sliding window has passed; return how many.

        Safe while a step that reads them is in flight: steps run in order on one device
        stream, so whoever reuses a block writes it after that step has read it.
        """
        upto = min(self.num_freeable_blocks(req), len(req.block_ids))
        num_freed = 0
        for i in range(req.num_freed_blocks, upto):
            b = req.block_ids[i]
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
            req.block_ids[i] = FREED_BLOCK
            num_freed += 1
        req.num_freed_blocks = max(req.num_freed_blocks, upto)
        return num_freed

    def free_request(self, req: Request) -> None:
        """Drop req's references; blocks nobody holds go back to the free list (tail first)."""
        for b in reversed(req.block_ids[req.num_freed_blocks :]):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
        req.block_ids = []
        req.num_freed_blocks = 0
        self.num_hashed.pop(req.req_id, None)
        self.last_hash.pop(req.req_id, None)

    # ---- invariants --------------------------------------------------------------------------
    def check_invariants(self, live: list[Request]) -> None:
        """Raise AssertionError unless refcounts, the free list and the tables agree."""
        counts = [0] * self.num_blocks
        for req in live:
            nf = req.num_freed_blocks
            held = req.block_ids[nf:]
            assert req.block_ids[:nf] == [FREED_BLOCK] * nf, f"{req.req_id}: freed entries"
            assert FREED_BLOCK not in held, f"{req.req_id}: a freed entry after a held block"
            assert nf <= self.num_freeable_blocks(req), (
                f"{req.req_id}: freed {nf} blocks but its window still reads block {nf - 1}"
            )
            assert len(set(held)) == len(held), f"{req.req_id} repeats a block"
            assert len(req.block_ids) * self.block_size >= req.num_computed_tokens, req.req_id
            for b in held:
                counts[b] += 1
        assert counts == self.ref_counts, "refcounts disagree with the block tables"
        for b in range(self.num_blocks):
            assert (b in self.free) == (self.ref_counts[b] == 0), f"block {b} free-list mismatch"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"prefix-cache entry {h} points at a rehashed block"
