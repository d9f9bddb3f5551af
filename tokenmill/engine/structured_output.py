"""Constrained decoding: grammars compiled off the step's path, token bitmasks per step.

The grammar library is xgrammar (docs/structured_output.md says why). Life of a constraint:

 1. SamplingParams(structured_outputs=...) checks it without a tokenizer (`check_constraint`):
    a bad schema or regex fails when the request is built, not inside a step.
 2. The first time the model runner sees a constrained request, the manager submits its
    compilation (tokenizer-specific, ~1-50 ms) to a background thread; equal constraints share
    one compilation (cached by `StructuredOutputsParams.key`). The forward pass runs meanwhile.
 3. Before sampling, the matchers of the constrained rows consume the output tokens they have
    not seen (one accept_token each; the engine lands the previous step's tokens first, see
    LLM.step), then all masks are filled (batch_fill_next_token_bitmask over chunks of rows
    on GrammarThreads) into a reused pinned int32 [max_num_seqs, ceil(vocab_size / 32)]
    buffer, copied to the device without waiting, and applied to the logits in one kernel
    launch. Two buffers take turns: a step fills one while the previous step's upload may
    still read the other.

EOS (every id in the request's eos_token_ids) is allowed only where the grammar accepts, so a
structure is never cut short by EOS; max_tokens still ends it ("length").

NOTE: xgrammar 0.2.9 lets length-bounded JSON strings (minLength / maxLength) contain raw
control characters, which no JSON parser accepts. JSON is generated compact, so no token with
a byte below 0x20 is ever valid in it: JSON rows also get a mask that bans those tokens, ANDed
in by the bitmask kernel on the device (not by the host, over every row, every step).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.engine.request import Request

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def check_constraint(key: tuple[str, str]):
    """The tokenizer-free xgrammar Grammar of a constraint key; ValueError if it is invalid."""
    import json

    import xgrammar as xgr

    kind, spec = key
    try:
        if kind == "json":
            json.loads(spec)
            # NOTE: compact JSON; with free whitespace small models can loop on blank lines.
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            alts = " | ".join(json.dumps(c) for c in json.loads(spec))
            return xgr.Grammar.from_ebnf(f"root ::= {alts}")
        if kind == "grammar":
            if "::=" in spec:
                return xgr.Grammar.from_ebnf(spec)
            return xgr.Grammar.from_lark(spec)
    except (ValueError, RuntimeError) as e:  # xgrammar raises RuntimeError on parse errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # xgrammar's "[time] file:line: "
        raise ValueError(f"invalid structured_outputs.{kind}: {first}") from None
    raise ValueError(f"unknown structured output kind {kind!r}")


class _RequestGrammar:
    """One request's matcher, created when its compilation lands; consumes output tokens."""

    def __init__(self, compiled: Future, is_json: bool):
        self.compiled = compiled
        self.is_json = is_json
        self.matcher = None
        self.num_consumed = 0  # output tokens the matcher has seen
        self.failed = False  # stopped constraining: compile error, a rejected token, or done

    def start(self, req: Request) -> None:
        """Create the matcher (waits for the compilation); a failed compile stops constraining."""
        import xgrammar as xgr

        try:
            compiled = self.compiled.result()
        except Exception as e:  # noqa: BLE001 - one bad grammar must not stop the batch
            logger.error("request %s: its constraint failed to compile: %s", req.req_id, e)
            self.failed = True
            return
        vocab = compiled.tokenizer_info.vocab_size
        stop = sorted(t for t in req.eos_token_ids if t < vocab) or None  # past it: banned
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop)


def advance_matchers(states: list[_RequestGrammar], reqs: list[Request]) -> None:
    """Feed each matcher the output tokens it has not seen.

    Normally one token per row. A rejected token (only reachable when something outside the
    mask picked it, e.g. a stop token id) or an accepted stop token (EOS under ignore_eos:
    nothing left to enforce) stops the row's constraining.

    NOTE: one accept_token per row, not BatchGrammarMatcher.batch_accept_token, nor threads:
    on an H200 host (benchmarks/grammar_fill.py, 700 rows) the loop took 2.2 ms a step,
    batch_accept_token 3.0 ms, and chunks on 2 / 4 / 8 threads 2.6 / 5.5 / 10.3 ms (accepting
    holds the GIL, so threads only add hand-offs). The loop reads each row's fields once (no
    method call per token): 713 rows one token each on the dev CPU, 2.5-3.1 -> 2.35-2.45 ms.
    """
    for s, r in zip(states, reqs):
        out = r.output_token_ids
        i, n = s.num_consumed, len(out)
        if s.failed or i >= n:
            continue
        matcher, eos = s.matcher, r.eos_token_ids
        while i < n:
            token = out[i]
            i += 1
            if not matcher.accept_token(token):
                logger.warning("request %s left its grammar at token %d", r.req_id, token)
                s.failed = True
                break
            if (not eos or token in eos) and matcher.is_terminated():
                s.failed = True
                break
        s.num_consumed = i


@dataclass
class GrammarMasks:
    """One step's masks for the constrained rows of a batch, filled on the host."""

    bitmask: torch.Tensor  # [num_masked_rows, num_words] int32, host (pinned on CUDA)
    rows: torch.Tensor  # [num_masked_rows] int32: the logits row of each bitmask row
    ban_control: torch.Tensor  # [num_masked_rows] int32: 1 = also ban control-byte tokens (JSON)
    ban_words: torch.Tensor  # [num_words] int32: tokens without bytes < 0x20
    slot: _HostSlot | None = None  # the reused host buffers behind the tensors above

    def host_bitmask_with_ban(self) -> torch.Tensor:
        """The bitmask with the JSON ban applied, as the device sees it (tests, benchmarks)."""
        return _with_ban(self.bitmask, self.ban_words, self.ban_control)


class _HostSlot:
    """Reused host buffers for one step's masks: [max_rows, num_words] bitmask and [2, max_rows]
    (rows, ban flags). Pinned on CUDA; `copied` is recorded after the upload reading them."""

    def __init__(self, max_rows: int, num_words: int, pin: bool):
        self.bitmask = torch.empty((max_rows, num_words), dtype=torch.int32, pin_memory=pin)
        self.meta = torch.empty((2, max_rows), dtype=torch.int32, pin_memory=pin)
        self.copied = torch.cuda.Event() if pin else None

    def wait_free(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # NOTE: two steps back; long done unless the host raced


MAX_FILL_THREADS = 8


def available_cpus() -> int:
    """CPUs this process may run on (a SLURM or taskset mask, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_threads(cpus: int | None = None) -> int:
    """Threads for the mask fill: one per two CPUs this process may use, at most eight (one
    on a 2-3 core machine, four on 8 cores, eight on a 16-core GPU host).

    Measured on H200 hosts (16 CPUs; benchmarks/structured_w2.py --arch qwen3-0.6b with Qwen's
    own 151,646-token vocabulary, ~690 rows a step under the person schema, every step a CUDA
    graph; 2026-11-30, twelfth session), JSON-schema cost against the unconstrained wall:
    one call 4 / 8 / 12 / 4 / 8 threads 1.42 / 1.10 / 1.17 / 1.33 / 1.10x (grammar apply
    14.0 / 9.0 / 11.3 / 13.6 / 9.4 ms a step), another host 4 / 8 threads 1.53 / 1.33x: eight
    beat four in all three pairs. On SmolLM2's shape (135M, host-bound) 4 / 8 / 4 / 8 gave
    1.49 / 1.45 / 1.59 / 1.67x: no difference beyond that host's noise. The eleventh session
    had four beat one in both pairs. A thread per CPU leaves none for the engine's own thread
    and the process's others (12 of 16 was slower than 8); eight is the most measured.
    `--grammar-threads` in structured_w2.py (or StructuredOutputManager.num_threads) tries
    others."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(MAX_FILL_THREADS, cpus // 2))


class GrammarThreads:
    """Fills many matchers' masks on `num_threads` threads: contiguous chunks of rows, each
    filled by its own BatchGrammarMatcher(max_threads=1) (xgrammar releases the GIL while
    filling); the calling thread fills the first chunk itself. Chunks hold at least
    MIN_CHUNK_ROWS rows, so a small batch stays on one thread."""

    MIN_CHUNK_ROWS = 32

    def __init__(self, num_threads: int):
        import xgrammar as xgr  # NOTE: only here: unconstrained runs never load it

        self.num_threads = max(1, num_threads)
        self._fillers = [xgr.BatchGrammarMatcher(max_threads=1) for _ in range(self.num_threads)]
        self._pool = (
            ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="grammar-fill")
            if self.num_threads > 1
            else None
        )

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        """bitmask[rows[i]] = the allowed tokens of matchers[i]."""
        n = len(matchers)
        k = min(self.num_threads, max(1, n // self.MIN_CHUNK_ROWS))
        cuts = [n * j // k for j in range(k + 1)]

        def part(j: int) -> None:
            lo, hi = cuts[j], cuts[j + 1]
            self._fillers[j].batch_fill_next_token_bitmask(matchers[lo:hi], bitmask, rows[lo:hi])

        futures = [self._pool.submit(part, j) for j in range(1, k)] if k > 1 else []
        part(0)
        for f in futures:
            f.result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def grammar_vocab_size(tokenizer) -> int:
    """The ids the grammar sees: the tokenizer's (its largest id + 1), not the model's padded
    vocabulary. Grammar masks ban the ids past it (tokenmill.kernels.bitmask).

    NOTE: xgrammar 0.2.9 takes every id without a token (padding) for a special token, and
    accept_token's cost grows with their number: a 49,152-token tokenizer under a model of
    151,936 ids made an accept 46-55 us instead of 13-13.5 (dev CPU, person.schema.json,
    uniformly drawn allowed tokens); on an H200 host (benchmarks/structured_w2.py --arch
    qwen3-0.6b) advancing took 27.5 of a constrained row's 35.4 us of grammar work.
    """
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


class StructuredOutputManager:
    """Compiles constraints for the runner's tokenizer and fills the per-step bitmasks."""

    def __init__(
        self,
        model_dir: str | Path | None,
        vocab_size: int,
        max_num_seqs: int = 256,
        device: torch.device | None = None,
        num_threads: int | None = None,
    ):
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the model's (logits width), may exceed the tokenizer's
        # bitmask words a row: the model's vocabulary until the tokenizer loads, then the
        # grammar's (see _get_compiler)
        self.num_words = (vocab_size + 31) // 32
        # the grammar's ids past the tokenizer's last id share its last word with padding ids
        # that xgrammar may leave set: this int32 keeps only the real ones (None: no such ids)
        self._last_word_keep: int | None = None
        self.max_num_seqs = max_num_seqs
        self.device = device or torch.device("cpu")
        self.num_threads = num_threads or default_num_threads()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._compiler = None
        self._tokenizer_info = None
        self._no_control_bytes = None  # [num_words] int32: tokens without bytes < 0x20
        self._ban_words_dev = None  # the same on self.device
        self._threads: GrammarThreads | None = None
        self._slots: list[_HostSlot] = []  # two, used in turn: a step fills one while the
        self._next_slot = 0  # previous step's upload may still read the other
        self._compiled: dict[tuple[str, str], Future] = {}
        self._states: weakref.WeakKeyDictionary[Request, _RequestGrammar] = (
            weakref.WeakKeyDictionary()
        )

    def _get_compiler(self):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        if self._compiler is None:
            if self.model_dir is None:
                raise ValueError("structured outputs need the model's tokenizer; none is loaded")
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            vocab = min(self.vocab_size, grammar_vocab_size(tokenizer))
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
            self._tokenizer_info = info
            self.num_words = (vocab + 31) // 32  # the ids past them: banned by the kernel
            if vocab < self.vocab_size and vocab % 32:
                self._last_word_keep = (1 << (vocab % 32)) - 1  # its real ids' bits (< 2**31)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def _json_safe_words(self) -> torch.Tensor:
        """Bitmask row allowing every token but those holding a control byte (< 0x20)."""
        if self._no_control_bytes is None:
            self._get_compiler()
            special = set(self._tokenizer_info.special_token_ids)
            bad = [
                i
                for i, b in enumerate(self._tokenizer_info.decoded_vocab)
                if i not in special and any(c < 0x20 for c in b)
            ]
            allowed = torch.ones(self.num_words * 32, dtype=torch.bool)
            allowed[bad] = False
            weights = (1 << torch.arange(32, dtype=torch.int64)).view(1, 32)
            words = (allowed.view(-1, 32).long() * weights).sum(dim=1)  # uint32 values
            self._no_control_bytes = (words - ((words >> 31) << 32)).to(torch.int32)
        return self._no_control_bytes

    def _compile(self, key: tuple[str, str]):
        return self._get_compiler().compile_grammar(check_constraint(key))

    def prefetch(self, reqs: list[Request]) -> None:
        """Start compiling the constraints of requests seen for the first time (no waiting)."""
        for req in reqs:
            so = req.params.structured_outputs
            if so is None or req in self._states:
                continue
            key = so.key
            if key not in self._compiled:
                self._compiled[key] = self._executor.submit(self._compile, key)
            self._states[req] = _RequestGrammar(
                self._compiled[key], is_json=key[0] in ("json", "json_object")
            )

    def _slot(self, num_rows: int) -> _HostSlot:
        if not self._slots or self._slots[0].bitmask.shape[0] < num_rows:
            rows = max(num_rows, self.max_num_seqs)
            pin = self.device.type == "cuda"
            self._slots = [_HostSlot(rows, self.num_words, pin) for _ in range(2)]
        slot = self._slots[self._next_slot]
        self._next_slot ^= 1
        slot.wait_free()
        return slot

    def fill(self, reqs: list[Request]) -> GrammarMasks | None:
        """Host masks of the constrained rows of `reqs`, after their matchers consumed every
        landed output token (waits for their compilations). None when no row is constrained.

        NOTE: the per-row Python here is list building and one accept_token per new token;
        masks fill in chunks on GrammarThreads (see default_num_threads for the figures).
        Filling on a background thread while the host processes outputs and schedules and
        prepares the next step was tried on an H200 (benchmarks/RESULTS.md, tenth session):
        the wait for the masks fell from ~10 to ~2 ms a step, the host's other phases slowed
        by as much, and the constrained wall did not move (mean 5.11 vs 5.15 s); reverted.
        Filling on the threads only beside the previous step's output processing, sampling
        still launched before the next schedule (thirteenth session, W2's shape with Qwen's
        vocabulary, four pairs): cost 1.27 / 1.06 / 1.25 / 1.03x against 1.09 / 1.18 / 1.12
        / 1.21x, no gain; kept on branch exp/fill-beside-outputs, not merged.
        """
        rows = [i for i, r in enumerate(reqs) if r.params.structured_outputs is not None]
        if not rows:
            return None
        creqs = [reqs[i] for i in rows]
        states = [self._states.get(r) for r in creqs]
        if None in states:  # not seen by execute_async's prefetch (direct callers)
            self.prefetch(creqs)
            states = [self._states[r] for r in creqs]
        for s, r in zip(states, creqs):
            if s.matcher is None and not s.failed:
                s.start(r)
        advance_matchers(states, creqs)
        n = len(rows)
        self._get_compiler()  # loads the tokenizer if no compile has: num_words is its width
        slot = self._slot(n)
        bitmask = slot.bitmask[:n]
        active = [j for j, s in enumerate(states) if not s.failed]
        if len(active) < n:
            bitmask.fill_(-1)  # rows no longer constrained allow every token (not padding)
        if self._threads is None or self._threads.num_threads != self.num_threads:
            if self._threads is not None:
                self._threads.shutdown()  # num_threads changed: the old workers go
            self._threads = GrammarThreads(self.num_threads)
        if active:
            self._threads.fill([states[j].matcher for j in active], bitmask, active)
        if self._last_word_keep is not None:  # padding ids in the last word: banned, every row
            bitmask[:, -1].bitwise_and_(self._last_word_keep)
        meta = slot.meta[:, :n]
        meta[0] = torch.tensor(rows, dtype=torch.int32)
        meta[1] = torch.tensor([s.is_json and not s.failed for s in states], dtype=torch.int32)
        return GrammarMasks(bitmask, meta[0], meta[1], self._json_safe_words(), slot)

    def warm_up(self, logits: torch.Tensor) -> None:
        """Launch the device mask kernel once on `logits` [rows, vocab_size] (overwritten) with
        a mask allowing every token, so the first constrained request does not compile it
        (ModelRunner.warm_up_kernels, on the GPU; the Triton interpreter elsewhere)."""
        from tokenmill.kernels.bitmask import apply_token_bitmask_

        rows, dev = logits.shape[0], logits.device
        ones = torch.full((rows, self.num_words), -1, dtype=torch.int32, device=dev)
        idx = torch.arange(rows, dtype=torch.int32, device=dev)
        apply_token_bitmask_(logits, ones, idx, ones[0].contiguous(), idx)

    def apply(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """In place: -inf on every token the grammar of a constrained row disallows now."""
        # logits: [num_seqs, vocab_size]
        masks = self.fill(reqs)
        if masks is None:
            return
        dev = logits.device
        if dev.type != "cuda":
            apply_token_bitmask_cpu_(
                logits, masks.bitmask, masks.rows, masks.ban_words, masks.ban_control
            )
            return
        from tokenmill.kernels.bitmask import apply_token_bitmask_

        if self._ban_words_dev is None:
            self._ban_words_dev = masks.ban_words.to(dev)
        n = masks.bitmask.shape[0]
        bitmask = masks.bitmask.to(dev, non_blocking=True)
        meta = masks.slot.meta.to(dev, non_blocking=True)[:, :n]
        masks.slot.copied.record()
        apply_token_bitmask_(logits, bitmask, meta[0], self._ban_words_dev, meta[1])


def apply_token_bitmask_torch_(
    logits: torch.Tensor,  # [num_seqs, vocab_size]
    bitmask: torch.Tensor,  # [num_masked_rows, ceil(vocab_size / 32)] int32
    rows: torch.Tensor,  # [num_masked_rows] logits row of each bitmask row
    ban_words: torch.Tensor | None = None,  # [ceil(vocab_size / 32)] int32
    ban_rows: torch.Tensor | None = None,  # [num_masked_rows] int32, 1 = AND ban_words in
) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t % 32 of bitmask[i, t // 32] is clear
    (of bitmask[i] & ban_words where ban_rows[i] is set), and for every t past the bitmask's
    words (a tokenizer shorter than the model's padded vocabulary).

    The CPU path, and the reference tokenmill.kernels.bitmask is tested against.
    """
    if bitmask.shape[0] == 0:
        return
    vocab_size = logits.shape[1]
    assert bitmask.shape[1] <= (vocab_size + 31) // 32, (
        f"bitmask has {bitmask.shape[1]} words, more than logits of {vocab_size} need"
    )
    rows = rows.long()
    bitmask = _with_ban(bitmask, ban_words, ban_rows)
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool()  # [num_masked_rows, words, 32]
    allowed = allowed.flatten(1)[:, :vocab_size]  # [num_masked_rows, <= vocab_size]
    if allowed.shape[1] < vocab_size:  # the ids past the bitmask are banned
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    every = torch.arange(rows.shape[0], device=rows.device)
    if rows.shape[0] == logits.shape[0] and bool((rows == every).all()):
        logits.masked_fill_(~allowed, float("-inf"))  # every row: no gather / scatter copies
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def _with_ban(bitmask, ban_words, ban_rows):
    """bitmask with ban_words ANDed into the rows whose ban_rows flag is set."""
    if ban_words is None:
        return bitmask
    return torch.where(ban_rows.bool()[:, None], bitmask & ban_words, bitmask)


# bit value -> what the logit is clipped to: 0 (banned) -inf, 1 (allowed) +inf (unchanged)
_CLIP = np.array([-np.inf, np.inf], dtype=np.float32)
_NUMPY_ROWS = 16  # rows unpacked at a time: their bits stay in cache


def apply_token_bitmask_cpu_(
    logits: torch.Tensor,  # [num_seqs, vocab_size] on the CPU
    bitmask: torch.Tensor,  # [num_masked_rows, ceil(vocab_size / 32)] int32
    rows: torch.Tensor,  # [num_masked_rows] logits row of each bitmask row
    ban_words: torch.Tensor | None = None,  # [ceil(vocab_size / 32)] int32
    ban_rows: torch.Tensor | None = None,  # [num_masked_rows] int32, 1 = AND ban_words in
) -> None:
    """The engine's CPU path: apply_token_bitmask_torch_'s result (but a NaN logit stays NaN),
    2.8x faster on float32 logits; any other dtype, or a big-endian host, takes the reference.

    numpy unpacks each word's bytes (little-endian: bit t % 32 of word t // 32 is bit t % 8
    of byte t // 8) and each logit is clipped to -inf where its bit is clear, a few rows at a
    time.

    NOTE: the torch expansion ([rows, words, 32] shifts, then masked_fill) took 75 ms for 200
    rows x 49,152 tokens on the dev CPU; this takes 27. The model's forward for those rows at
    SmolLM2's size is about 250 ms."""
    fast = logits.dtype == torch.float32 and logits.is_contiguous() and sys.byteorder == "little"
    if not fast or bitmask.shape[0] == 0:
        apply_token_bitmask_torch_(logits, bitmask, rows, ban_words, ban_rows)
        return
    bitmask = _with_ban(bitmask, ban_words, ban_rows)
    vocab_size = logits.shape[1]
    covered = min(vocab_size, 32 * bitmask.shape[1])  # the ids past the bitmask are banned
    out = logits.numpy()
    masks = bitmask.contiguous().numpy().view(np.uint8)  # [num_masked_rows, 4 * words]
    targets = rows.tolist()
    if covered < vocab_size:
        out[targets, covered:] = -np.inf
        out = out[:, :covered]
    for lo in range(0, len(targets), _NUMPY_ROWS):
        hi = min(lo + _NUMPY_ROWS, len(targets))
        clip = _CLIP[np.unpackbits(masks[lo:hi], axis=1, bitorder="little")[:, :covered]]
        first = targets[lo]
        if targets[lo:hi] == list(range(first, first + hi - lo)):  # consecutive rows: a view
            np.minimum(out[first : first + hi - lo], clip, out=out[first : first + hi - lo])
        else:
            out[targets[lo:hi]] = np.minimum(out[targets[lo:hi]], clip)
