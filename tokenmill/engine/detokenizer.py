"""Token ids -> text, incrementally, with stop strings.

Decoding only the new token alone gets spaces and multi-byte characters wrong, so each step
decodes a short window twice: the tokens before the new ones (prefix) and the window with the
new ones; the new text is the difference. The window starts a few prompt tokens back, so the
first output token's leading space comes out right. A window ending in U+FFFD (half a
multi-byte character) waits for the next token.
"""

from __future__ import annotations

from tokenmill.engine.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Text of one completion; `add` returns the stop string that ended it, if any."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop or []
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        context = prompt_token_ids[-_PROMPT_CONTEXT:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stopped = False

    def add(self, new_ids: list[int]) -> str | None:
        if self.stopped:
            return None
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix = decode(
            self.ids[self.prefix_offset : self.read_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return self._check_stop(len(delta))

    def _check_stop(self, delta_len: int) -> str | None:
        if not self.stop:
            return None
        start = max(0, len(self.text) - delta_len - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stopped = True
        return s

    def flush(self) -> str | None:
        """The completion ended: emit what was held back for a half character. Returns the
        stop string this reveals, if any."""
        if self.stopped or self.read_offset >= len(self.ids):
            return None
        decode = self.tokenizer.decode
        prefix = decode(
            self.ids[self.prefix_offset : self.read_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        if len(full) <= len(prefix):
            return None
        delta = full[len(prefix) :]
        self.text += delta
        return self._check_stop(len(delta))

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, hold back a tail that may begin a stop string."""
        if finished or not self.stop or self.stopped:
            return self.text
        return self.text[: max(0, len(self.text) - (self.max_stop_len - 1))]
