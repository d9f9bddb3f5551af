"""The window loop: rows in, engine requests out, results back in input order.

    rows ──window──> tokenize in bulk ──sort/bin──> llm.add_request ... llm.step() ──> results
                                                                   reorder buffer ──> writer

A window of `window_rows` rows is tokenized in one tokenizer call, ordered (see ordering.py:
longest work first, rows sharing a prefix together, each group's leader a step ahead) and queued
to the engine as one continuous batch. The next
window is queued while the current one drains (once fewer than `refill_below` requests are left),
so the scheduler never runs dry at a window boundary. Rows finish in any order; the reorder
buffer releases the longest finished prefix in input order. Memory stays bounded: at most two
windows of rows are held at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.client import EngineClient
from tokenmill.engine.input_processor import InputError, InputProcessor, ModelLimits
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io.ordering import order_window
from tokenmill.io.parse import RowError, RowParser
from tokenmill.io.rows import RawRecord, Row, RowResult
from tokenmill.io.text import writable

# InputError codes (engine/input_processor.py) -> the batch job's documented row error types
_ROW_ERROR_TYPES = {
    "empty_prompt": "empty_prompt",
    "context_length_exceeded": "prompt_too_long",
    "invalid_value": "invalid_row",  # e.g. token ids outside the vocabulary
}


@dataclass
class _Pending:
    position: int
    row: Row
    num_prompt_tokens: int


@dataclass
class Prepared:
    """A row ready for the engine: its position in this shard's row sequence and token ids."""

    position: int
    row: Row
    token_ids: list[int]
    params: SamplingParams


class Batcher:
    """Feeds an engine window by window and yields finished rows in input order.

    `records` yields (position, RawRecord) in input order; `on_step()` is called after every
    engine step (progress, periodic commits); `should_stop()` ends the run early (signals,
    --fail-fast): requests still in the engine are aborted and nothing more is yielded.
    `on_finish(position, RowResult)` sees each row the moment it finishes, in any order, and
    returns what the reorder buffer holds and `run` yields (by default the RowResult itself);
    `run(replayed=...)` takes such items for positions finished by an earlier run, which are
    released in their place without reaching the engine.
    """

    def __init__(
        self,
        llm: EngineClient,
        parser: RowParser,
        window_rows: int,
        sort: bool = True,
        refill_below: int | None = None,
        on_finish: Callable[[int, RowResult], Any] | None = None,
    ):
        self.llm = llm
        self.on_finish = on_finish or (lambda position, result: result)
        self.parser = parser
        self.window_rows = window_rows
        self.sort = sort
        info = llm.model_info()
        max_num_seqs = info.get("max_num_seqs") or 256
        self.step_tokens = info.get("max_num_batched_tokens") or 8192
        self.refill_below = refill_below if refill_below is not None else max_num_seqs
        # The engine's own prompt checks (engine/input_processor.py), on token ids: the same
        # rule as `serve` and LLM.add_request, turned into row errors.
        self._checks = InputProcessor(None, ModelLimits.of(llm))
        self._ready: dict[int, Any] = {}  # position -> finished row, not yet released
        self._pending: dict[str, _Pending] = {}  # request id -> what it belongs to

    def run(
        self,
        records: Iterator[tuple[int, RawRecord]],
        first_position: int,
        on_step: Callable[[], None] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
        replayed: dict[int, Any] | None = None,
    ) -> Iterator[Any]:
        self._replayed = replayed or {}
        next_release = first_position
        next_load = first_position
        exhausted = False
        while True:
            # Queue another window while the engine drains, if memory allows.
            while (
                not exhausted
                and len(self._pending) < self.refill_below
                and next_load - next_release < self.window_rows
            ):
                window = _take(records, self.window_rows)
                if not window:
                    exhausted = True
                    break
                next_load = window[-1][0] + 1
                self._submit(self._prepare(window))
            if should_stop():
                self.abort_all()
                return
            if self._pending:
                for out in self.llm.step():
                    if out.finished:
                        self._finish(out)
                on_step()
            while next_release in self._ready:
                yield self._ready.pop(next_release)
                next_release += 1
            if exhausted and not self._pending and not self._ready:
                return
            if exhausted and not self._pending and self._ready:  # pragma: no cover - a bug
                raise RuntimeError(
                    f"rows {sorted(self._ready)[:5]} finished but row {next_release} never did"
                )

    def abort_all(self) -> None:
        for request_id in list(self._pending):
            self.llm.abort_request(request_id)
        self._pending.clear()

    # Stages -------------------------------------------------------------------------------------
    def _prepare(self, window: list[tuple[int, RawRecord]]) -> list[Prepared]:
        """Parse and tokenize a window; unusable rows go straight to the reorder buffer."""
        for pos, _ in window:
            if pos in self._replayed:
                self._ready[pos] = self._replayed.pop(pos)
        rows = [(pos, self.parser.parse(rec)) for pos, rec in window if pos not in self._ready]
        texts = [
            (pos, row) for pos, row in rows if row.error is None and isinstance(row.prompt, str)
        ]
        encoded = self._encode_texts([row.prompt for _, row in texts]) if texts else []
        token_ids = {pos: ids for (pos, _), ids in zip(texts, encoded, strict=True)}
        prepared = []
        for pos, row in rows:
            try:
                if row.error is not None:
                    raise RowError(row.error, row.error_type or "invalid_row")
                if row.messages is not None:
                    ids = list(self.llm.encode_chat(row.messages))
                elif pos in token_ids:
                    ids = token_ids[pos]
                    if isinstance(ids, Exception):
                        raise ids
                else:
                    ids = list(row.prompt)  # pre-tokenized
                params = self.parser.params(row)
                self._check_length(row, ids, params)
                prepared.append(Prepared(pos, row, ids, params))
            except RowError as e:
                self._done(pos, RowResult(row, error=str(e), error_type=e.error_type))
            except Exception as e:  # noqa: BLE001 - a template or tokenizer failing on one row
                error = writable(f"{_where(row)}cannot tokenize: {e}")
                self._done(pos, RowResult(row, error=error, error_type="tokenize_error"))
        return prepared

    def _submit(self, prepared: list[Prepared]) -> None:
        if self.sort:
            prepared = order_window(prepared, self.step_tokens)
        for p in prepared:
            request_id = str(p.position)
            try:
                # Only finished rows are used: no incremental detokenizing (stream=False).
                self.llm.add_request(request_id, p.token_ids, p.params, stream=False)
            except Exception as e:  # noqa: BLE001 - the engine refusing one row's request
                self._done(
                    p.position, RowResult(p.row, error=f"{_where(p.row)}{e}", error_type="rejected")
                )
                continue
            self._pending[request_id] = _Pending(p.position, p.row, len(p.token_ids))

    def _finish(self, out) -> None:
        pending = self._pending.pop(out.request_id)
        completions = sorted(out.outputs, key=lambda c: c.index)
        params = self.parser.params(pending.row)
        num_top = params.logprobs
        result = RowResult(
            pending.row,
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            num_prompt_tokens=len(out.prompt_token_ids) or pending.num_prompt_tokens,
            num_output_tokens=sum(len(c.token_ids) for c in completions),
            logprobs=None if num_top is None else [self._logprobs(c, num_top) for c in completions],
            parsed=_parsed(params, completions),
        )
        self._done(pending.position, result)

    def _done(self, position: int, result: RowResult) -> None:
        self._ready[position] = self.on_finish(position, result)

    # Helpers ------------------------------------------------------------------------------------
    def _encode_texts(self, texts: list[str]) -> list[list[int] | Exception]:
        """Token ids per text; a text the tokenizer refuses gets its exception instead."""
        try:
            return self.llm.encode_batch(texts)  # one call: the fast tokenizer's threads
        except Exception:  # noqa: BLE001 - one bad text fails the whole call: find it
            return [self._encode_one(text) for text in texts]

    def _encode_one(self, text: str) -> list[int] | Exception:
        try:
            return self.llm.encode_batch([text])[0]
        except Exception as e:  # noqa: BLE001 - becomes this row's tokenize_error
            return e

    def _check_length(self, row: Row, ids: list[int], params) -> None:
        """The front door's checks of a tokenized row; a failure is this row's error."""
        try:
            self._checks.check_prompt(ids, params, "prompt")
        except InputError as e:
            kind = _ROW_ERROR_TYPES.get(e.code, "invalid_row")
            if kind == "prompt_too_long":
                raise RowError(
                    f"{_where(row)}{e.message} Or raise --max-model-len or --kv-cache-memory.",
                    kind,
                ) from None
            raise RowError(f"{_where(row)}{e.message}", kind) from None

    def _logprobs(self, completion, num_top: int) -> list[dict[str, Any]] | None:
        if completion.logprobs is None:
            return None
        entries = []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False):
            top = sorted(candidates.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
            entry = (
                self._lp_entry(token_id, candidates[token_id])
                if token_id in candidates
                else {
                    "token_id": token_id,
                    "token": self._token_text(token_id, None),
                    "logprob": None,
                }
            )
            entry["top_logprobs"] = [self._lp_entry(t, lp) for t, lp in top[:num_top]]
            entries.append(entry)
        return entries

    def _lp_entry(self, token_id: int, lp) -> dict[str, Any]:
        return {
            "token_id": token_id,
            "token": self._token_text(token_id, lp.decoded_token),
            "logprob": lp.logprob,
        }

    def _token_text(self, token_id: int, decoded: str | None) -> str:
        return decoded if decoded is not None else self.llm.decode([token_id])


def _take(records: Iterator[tuple[int, RawRecord]], num: int) -> list[tuple[int, RawRecord]]:
    out = []
    for item in records:
        out.append(item)
        if len(out) >= num:
            break
    return out


def _where(row: Row) -> str:
    return f"line {row.line}: " if row.line is not None else f"row {row.index}: "


def _parsed(params, completions) -> list[Any] | None:
    """Each completion's JSON value when the row was JSON-constrained (None where cut short)."""
    so = params.structured_outputs
    if so is None or (so.json is None and not so.json_object):
        return None
    values = []
    for c in completions:
        try:
            values.append(json.loads(c.text))
        except ValueError:  # finish_reason "length": the structure was cut short
            values.append(None)
    return values
