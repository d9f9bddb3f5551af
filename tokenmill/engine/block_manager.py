"""Paged KV-cache bookkeeping in plain integers: free list, block tables, refcounts, prefix cache.

Block b holds the K/V of block_size consecutive tokens of one or more sequences. A request's
block_ids list is its block table: token at position p lives in block block_ids[p // block_size]
at offset p % block_size, i.e. in cache slot block_ids[p // block_size] * block_size + p % bs.

Prefix caching: a block that is full gets a hash of (previous block's hash, its tokens). A new
request whose first full prompt blocks have the same hashes shares those blocks (refcount + 1)
instead of recomputing them. A freed block keeps its hash and stays reusable until the free
list hands it out for something else (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.engine.request import Request


def _block_hash(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Allocates KV blocks to requests. No torch: the model runner turns ids into slots."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        # Free blocks, oldest-freed first; a free block may still be a prefix-cache entry.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # Per request: how many of its blocks are hashed (full and registered).
        self.num_hashed: dict[str, int] = {}
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
        """Whether req's block table can grow to cover num_tokens tokens."""
        return self.blocks_needed(num_tokens) - len(req.block_ids) <= len(self.free)

    # ---- allocation --------------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Attach cached blocks of req's leading full blocks; return tokens they cover.

        At least one prompt token is always left to compute, so the step that finishes the
        prompt has logits to sample from.
        """
        assert not req.block_ids and req.num_computed_tokens == 0
        self.num_hashed[req.req_id] = 0
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        tokens = req.token_ids(0, req.num_tokens)
        max_blocks = (len(tokens) - 1) // self.block_size
        self.prefix_queries += len(req.prompt_token_ids)
        parent = None
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
        parent = self.block_hash[req.block_ids[done - 1]] if done else None
        for i in range(done, num_full):
            b = req.block_ids[i]
            chunk = tuple(req.token_ids(i * self.block_size, (i + 1) * self.block_size))
            h = _block_hash(parent, chunk)
            if self.block_hash[b] is None:
                self.block_hash[b] = h
                self.block_tokens[b] = chunk
                self.cached.setdefault(h, b)
            parent = h
        self.num_hashed[req.req_id] = num_full

    def free_request(self, req: Request) -> None:
        """Drop req's references; blocks nobody holds go back to the free list (tail first)."""
        for b in reversed(req.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
        req.block_ids = []
        self.num_hashed.pop(req.req_id, None)

    # ---- invariants --------------------------------------------------------------------------
    def check_invariants(self, live: list[Request]) -> None:
        """Raise AssertionError unless refcounts, the free list and the tables agree."""
        counts = [0] * self.num_blocks
        for req in live:
            assert len(set(req.block_ids)) == len(req.block_ids), f"{req.req_id} repeats a block"
            assert len(req.block_ids) * self.block_size >= req.num_computed_tokens, req.req_id
            for b in req.block_ids:
                counts[b] += 1
        assert counts == self.ref_counts, "refcounts disagree with the block tables"
        for b in range(self.num_blocks):
            assert (b in self.free) == (self.ref_counts[b] == 0), f"block {b} free-list mismatch"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"prefix-cache entry {h} points at a rehashed block"
