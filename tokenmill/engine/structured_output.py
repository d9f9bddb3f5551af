"""Constrained decoding: grammars compiled off the step's path, token bitmasks per step.

The grammar library is xgrammar (docs/structured_output.md says why). Life of a constraint:

 1. SamplingParams(structured_outputs=...) checks it without a tokenizer (`check_constraint`):
    a bad schema or regex fails when the request is built, not inside a step.
 2. The first time the model runner sees a constrained request, the manager submits its
    compilation (tokenizer-specific, ~1-50 ms) to a background thread; equal constraints share
    one compilation (cached by `StructuredOutputsParams.key`). The forward pass runs meanwhile.
 3. Before sampling, each constrained row's matcher consumes the output tokens it has not seen
    (the engine keeps these rows in sync: their previous token is on the host), then all masks
    are filled into one pinned int32 [num_constrained, ceil(vocab_size / 32)] tensor, copied to
    the device without waiting, and applied to the logits in one kernel launch.

EOS (every id in the request's eos_token_ids) is allowed only where the grammar accepts, so a
structure is never cut short by EOS; max_tokens still ends it ("length").

NOTE: xgrammar 0.2.9 lets length-bounded JSON strings (minLength / maxLength) contain raw
control characters, which no JSON parser accepts. JSON is generated compact, so no token with
a byte below 0x20 is ever valid in it: JSON rows also get a mask that bans those tokens.
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

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
        self.num_consumed = 0
        self.failed = False

    def synced(self, req: Request):
        """The matcher after every output token so far; None once it stopped constraining."""
        import xgrammar as xgr

        if self.matcher is None and not self.failed:
            try:
                compiled = self.compiled.result()
            except Exception as e:  # noqa: BLE001 - one bad grammar must not stop the batch
                logger.error("request %s: its constraint failed to compile: %s", req.req_id, e)
                self.failed = True
                return None
            stop = sorted(req.eos_token_ids) or None
            self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop)
        new = req.output_token_ids[self.num_consumed :]
        self.num_consumed = req.num_output_tokens
        for token in new:
            if self.failed:
                break
            if not self.matcher.accept_token(token):
                # Only reachable when something outside the mask picked the token (e.g. a stop
                # token id); stop constraining rather than mask every token forever.
                logger.warning("request %s left its grammar at token %d", req.req_id, token)
                self.failed = True
            elif self.matcher.is_terminated():
                self.failed = True  # EOS accepted but ignored (ignore_eos): nothing to enforce
        return None if self.failed else self.matcher


class StructuredOutputManager:
    """Compiles constraints for the runner's tokenizer and fills the per-step bitmasks."""

    def __init__(self, model_dir: str | Path | None, vocab_size: int):
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the model's (logits width), may exceed the tokenizer's
        self.num_words = (vocab_size + 31) // 32
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._compiler = None
        self._tokenizer_info = None
        self._no_control_bytes = None  # [num_words] int32: tokens without bytes < 0x20
        self._batch_matcher = None
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
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            self._tokenizer_info = info
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

    def fill_bitmask(self, reqs: list[Request]) -> tuple[torch.Tensor, list[int]] | None:
        """Host bitmasks of the constrained rows of `reqs` (waits for their compilations).

        Returns (bitmask [num_constrained, ceil(vocab_size / 32)] int32 on the CPU, their row
        indices in reqs), or None when no row is constrained.
        """
        rows = [i for i, r in enumerate(reqs) if r.params.structured_outputs is not None]
        if not rows:
            return None
        import xgrammar as xgr  # NOTE: only here: unconstrained steps never load it

        self.prefetch([reqs[i] for i in rows])
        states = [self._states[reqs[i]] for i in rows]
        matchers = [s.synced(reqs[i]) for s, i in zip(states, rows)]
        bitmask = torch.full(
            (len(rows), self.num_words),
            -1,
            dtype=torch.int32,
            pin_memory=torch.cuda.is_available(),
        )
        active = [j for j, s in enumerate(states) if not s.failed]
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        if active:
            self._batch_matcher.batch_fill_next_token_bitmask(
                [matchers[j] for j in active], bitmask, active
            )
        json_rows = [j for j in active if states[j].is_json]
        if len(json_rows) == len(rows):
            bitmask &= self._json_safe_words()  # NOTE: in place; indexing would copy
        elif json_rows:
            bitmask[json_rows] &= self._json_safe_words()
        return bitmask, rows

    def apply(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """In place: -inf on every token the grammar of a constrained row disallows now."""
        # logits: [num_seqs, vocab_size]
        filled = self.fill_bitmask(reqs)
        if filled is None:
            return
        bitmask, rows = filled
        dev = logits.device
        if dev.type == "cuda":
            from tokenmill.kernels.bitmask import apply_token_bitmask_

            rows_t = torch.tensor(rows, dtype=torch.long).pin_memory().to(dev, non_blocking=True)
            apply_token_bitmask_(logits, bitmask.to(dev, non_blocking=True), rows_t)
        else:
            apply_token_bitmask_torch_(logits, bitmask, torch.tensor(rows, dtype=torch.long))


def apply_token_bitmask_torch_(
    logits: torch.Tensor,  # [num_seqs, vocab_size]
    bitmask: torch.Tensor,  # [num_masked_rows, ceil(vocab_size / 32)] int32
    rows: torch.Tensor,  # [num_masked_rows] logits row of each bitmask row
) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t % 32 of bitmask[i, t // 32] is clear.

    The CPU path, and the reference tokenmill.kernels.bitmask is tested against.
    """
    if bitmask.shape[0] == 0:
        return
    vocab_size = logits.shape[1]
    assert bitmask.shape[1] * 32 >= vocab_size, (
        f"bitmask covers {bitmask.shape[1] * 32} tokens, logits have {vocab_size}"
    )
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool()  # [num_masked_rows, words, 32]
    allowed = allowed.flatten(1)[:, :vocab_size]  # [num_masked_rows, vocab_size]
    if rows.shape[0] == logits.shape[0] and bool((rows == torch.arange(rows.shape[0])).all()):
        logits.masked_fill_(~allowed, float("-inf"))  # every row: no gather / scatter copies
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
