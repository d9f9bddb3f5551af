"""Token ids -> text, incrementally, with stop strings.

Decoding only the new token alone gets spaces and multi-byte characters wrong. With a fast
(Rust) tokenizer, the `tokenizers` library's DecodeStream does it right: it keeps the last
few ids, starts from a few prompt tokens (so the first output token's leading space comes
out right) and holds back half a multi-byte character; 1.4 against 6.0 us a token for the
window decoding below (SmolLM2's tokenizer, one token at a time), which is what a streaming
server pays per token. Other tokenizers (or one that cleans up spaces after decoding, which
DecodeStream does not) decode a short window twice each step: the tokens before the new ones
(prefix) and the window with them; the new text is the difference, and a window ending in
U+FFFD (half a character) waits for the next token.
"""

from __future__ import annotations

from typing import Any

from tokenmill.engine.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5


def _decode_stream(tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool):
    """(backend tokenizer, DecodeStream primed with the prompt's last tokens), or None where
    the window decoding must be used."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    # DecodeStream takes a context whose text ends in U+FFFD as the start of a character
    # still to come, and would emit that text with the first output token. So the context
    # starts up to 3 tokens earlier, to take in the whole of a character the prompt's last
    # tokens cut; a prompt that ends mid-character (token ids can) uses the window decoding.
    last = max(0, len(prompt_ids) - _PROMPT_CONTEXT)
    for start in range(last, max(-1, last - 4), -1):
        context = prompt_ids[start:]
        if not backend.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            try:
                stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers < 0.22: no DecodeStream(ids=...)
                return None
            return backend, stream
    return None


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
        self._stream = _decode_stream(tokenizer, prompt_token_ids, self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str | None:
        if self.stopped:
            return None
        self.ids.extend(new_ids)
        if self._stream is not None:
            backend, stream = self._stream
            try:
                delta = stream.step(backend, list(new_ids))
            except Exception:  # its text stopped extending its prefix: decode by windows
                self._stream, delta = None, None
            if self._stream is not None:
                if not delta:  # None: half a character, held back until its other bytes come
                    return None
                # flush() decodes from here if the completion ends on half a character
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                self.text += delta
                return self._check_stop(len(delta))
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
