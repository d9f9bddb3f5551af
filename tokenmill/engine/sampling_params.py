"""SamplingParams: how one request is decoded. Names and defaults follow vLLM."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tokenmill.engine.tokens import are_token_ids

_GREEDY_EPS = 1e-5
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; a bias of -100 bans the token outright


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's names): set exactly one of the fields.

    json: a JSON schema (dict or JSON text); regex: a regular expression the whole output
    matches; choice: the output is one of these strings; grammar: a context-free grammar in
    EBNF (GBNF, `root ::= ...`) or Lark (`start: ...`); json_object: any JSON object.
    Constraints are checked (without a tokenizer) when the params are built: a bad schema or
    regex raises ValueError here, not in the middle of a batch.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object (got {', '.join(kinds) or 'none'})"
            )
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise ValueError(
                    f"structured_outputs.choice must be a non-empty list of non-empty strings "
                    f"(got {self.choice!r})"
                )
            self.choice = list(self.choice)
        from tokenmill.engine.structured_output import check_constraint

        check_constraint(self.key)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar (the cache key)."""
        import json

        if self.json is not None:
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", spec
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


@dataclass
class SamplingParams:
    """Decoding options for one request. Invalid values raise ValueError naming the field."""

    n: int = field(default=1, metadata={"help": "Completions to generate per prompt."})
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature; 0 means greedy decoding."}
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Nucleus sampling: keep the smallest set of tokens whose "
            "probability adds up to top_p (0 < top_p <= 1)."
        },
    )
    top_k: int = field(
        default=-1, metadata={"help": "Keep only the top_k most likely tokens (-1 or 0: off)."}
    )
    min_p: float = field(
        default=0.0,
        metadata={
            "help": "Drop tokens whose probability is below min_p times the "
            "most likely token's (0 <= min_p <= 1)."
        },
    )
    presence_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Subtracted once from the logit of every token already generated (-2..2)."
        },
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Subtracted from a token's logit once per time it was generated (-2..2)."
        },
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Divides positive (multiplies negative) logits of tokens "
            "seen in the prompt or output; 1 is off (> 0)."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Per-request seed: the same seed gives the same samples "
            "whatever else is in the batch."
        },
    )
    stop: str | list[str] | None = field(
        default=None, metadata={"help": "Stop when the text contains one of these strings."}
    )
    stop_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Stop when one of these token ids is generated."}
    )
    include_stop_str_in_output: bool = field(
        default=False, metadata={"help": "Keep the matched stop string in the output text."}
    )
    ignore_eos: bool = field(
        default=False, metadata={"help": "Keep generating past the end-of-sequence token."}
    )
    max_tokens: int | None = field(
        default=16,
        metadata={
            "help": "Most tokens to generate per completion (None: up to the model's context)."
        },
    )
    min_tokens: int = field(
        default=0,
        metadata={
            "help": "Generate at least this many tokens before EOS or "
            "stop_token_ids may end the completion."
        },
    )
    logprobs: int | None = field(
        default=None,
        metadata={
            "help": "Return the log-probabilities of the sampled token and "
            "of the top-N alternatives per generated token."
        },
    )
    prompt_logprobs: int | None = field(
        default=None,
        metadata={
            "help": "Return the log-probability of every prompt token (None for the first) "
            "and of the top-N alternatives at each prompt position."
        },
    )
    logit_bias: dict[int, float] | None = field(
        default=None,
        metadata={
            "help": "Token id -> bias added to its logit before sampling (-100..100; "
            "-100 bans the token)."
        },
    )
    structured_outputs: StructuredOutputsParams | None = field(
        default=None,
        metadata={
            "help": "Constrain the output to a JSON schema, regex, choice or grammar "
            "(StructuredOutputsParams)."
        },
    )
    skip_special_tokens: bool = field(
        default=True, metadata={"help": "Leave special tokens out of the output text."}
    )

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number (got {v!r})")
        for name in ("n", "top_k", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer (got {v!r})")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or not are_token_ids(self.stop_token_ids)
        ):
            raise ValueError(
                f"stop_token_ids must be a list of token ids (got {self.stop_token_ids!r})"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is not None:
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:
            self.logit_bias = _check_logit_bias(self.logit_bias)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule} (got {getattr(self, name)!r})")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", ">= 1")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "> 0")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", ">= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "a non-negative integer or None")
        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool)
            or not isinstance(self.prompt_logprobs, int)
            or self.prompt_logprobs < 0
        ):
            raise bad("prompt_logprobs", "a non-negative integer or None")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise bad("structured_outputs", "a StructuredOutputsParams or a dict of its fields")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict (a JSON row's overrides); unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready): structured_outputs becomes a dict of its set fields."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.structured_outputs is not None:
            so = asdict(self.structured_outputs)
            d["structured_outputs"] = {k: v for k, v in so.items() if v is not None}
        return d

    def replace(self, **changes: Any) -> SamplingParams:
        return SamplingParams(**{**self.to_dict(), **changes})


# OpenAI / vLLM request fields that carry an output constraint.
OPENAI_STRUCTURED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def structured_outputs_from_openai(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The constraint of an OpenAI/vLLM request body (fields OPENAI_STRUCTURED_FIELDS).

    response_format: {"type": "text"} (none), {"type": "json_object"}, or {"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}; vLLM's
    structured_outputs object and guided_json / guided_regex / guided_choice / guided_grammar.
    ValueError (saying which field) when malformed or when several are given.
    """
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError(
                    'response_format json_schema needs {"json_schema": {"name": ..., '
                    '"schema": {...}}}'
                )
            found.append(("response_format", StructuredOutputsParams(json=schema)))
        elif kind != "text":
            raise ValueError(
                f"response_format.type must be text, json_object or json_schema (got {kind!r})"
            )
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ValueError('structured_outputs must be an object like {"regex": "..."}')
        found.append(("structured_outputs", StructuredOutputsParams(**so)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex")):
        if body.get(name) is not None:
            found.append((name, StructuredOutputsParams(**{key: body[name]})))
    for name, key in (("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if body.get(name) is not None:
            found.append((name, StructuredOutputsParams(**{key: body[name]})))
    if len(found) > 1:
        raise ValueError(f"give one output constraint, not {', '.join(n for n, _ in found)}")
    return found[0][1] if found else None


def _check_logit_bias(bias: Any) -> dict[int, float]:
    """{token id: bias} with int ids (JSON gives string keys) and biases in [-100, 100]."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias (got {bias!r})")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            token_id = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids (got {k!r})") from None
        if isinstance(k, bool) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0 (got {k!r})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"logit_bias[{k}] must be a number (got {v!r})")
        if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{k}] must be in [-100, 100] (got {v!r})")
        out[token_id] = float(v)
    return out
