"""OpenAI request / response shapes (pydantic), plus tokenmill's extras.

Requests accept the fields the official `openai` client sends; tokenmill's sampling extras
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`) arrive
at the top level of the JSON body through the client's `extra_body`. Unknown fields are
ignored, as OpenAI does. Types are strict (`"5"` is not an int, `"yes"` not a bool), lists are
bounded, and text holding a lone surrogate (`"\\ud800"`) is refused with `InvalidText`.
`to_sampling_params` maps a request onto SamplingParams through the engine's one OpenAI
adapter (engine/openai_params.py), so `serve` and `generate` share every default.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tokenmill.engine.openai_params import chat_params, completion_params, template_message
from tokenmill.engine.sampling_params import SamplingParams

MAX_PROMPTS = 4096  # prompts in one /v1/completions request
MAX_MESSAGES = 4096
MAX_STOP = 16  # stop strings
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_CHOICES = 1024  # guided_choice strings
MAX_TOOLS = 128  # as OpenAI's
ROLES = ("system", "developer", "user", "assistant", "tool")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class InvalidText(Exception):
    """A request string that is not valid Unicode; `param` is where it sits."""

    def __init__(self, param: str) -> None:
        super().__init__(
            f"{param} is not valid Unicode text (it holds a lone surrogate such as \\ud800); "
            "send UTF-8 text"
        )
        self.param = param


def check_unicode(value: Any, where: str = "") -> None:
    """Raise InvalidText for a string anywhere in `value` that UTF-8 cannot encode.

    NOTE: not a ValueError on purpose: pydantic would fold it into a validation error without
    the field's name; the app's handler turns it into a 400 naming `param`.
    NOTE: runs on every request body: numbers are skipped without a call (a prompt of token ids
    holds thousands), and the path is built only for the bad string."""
    path = _bad_text_path(value)
    if path is not None:
        raise InvalidText(f"{where}{path}" if where else (path.lstrip(".") or "body"))


_NO_TEXT = frozenset({int, float, bool, type(None)})


def _bad_text_path(value: Any) -> str | None:
    """ "" if `value` is a string UTF-8 cannot encode; ".k[3]"-style path of one inside it;
    None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ""
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and _bad_text_path(k) is not None:
                return ""  # a bad key: the object holding it
            if isinstance(v, (str, dict, list)):
                path = _bad_text_path(v)
                if path is not None:
                    return f".{k}{path}"
    elif isinstance(value, list):
        if _NO_TEXT.issuperset(map(type, value)):  # token ids: one pass in C, no Python loop
            return None
        for i, v in enumerate(value):
            if isinstance(v, (str, dict, list)):
                path = _bad_text_path(v)
                if path is not None:
                    return f"[{i}]{path}"
    return None


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Body(_Base):
    """A request body: every string in it checked for lone surrogates first."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class StreamOptions(_Base):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions.

    A sampling field left out (None) takes the adapter's default (engine/openai_params.py), so
    no default is written twice.
    """

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # tokenmill / vLLM extras, sent through `extra_body`
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # output constraints and logit_bias (engine/openai_params.py maps them)
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[int], Field(min_length=1)]


def _prompt_kind(value: Any) -> str | None:
    """Which form a completion prompt takes, from its first element. The union is picked by
    this tag instead of pydantic trying each member: a 600-token id prompt took 135 us to
    validate that way (list[str] checked, and failed, every element first), 7 us by tag."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    if value and isinstance(value[0], str):
        return "texts"
    if value and isinstance(value[0], list):
        return "id_lists"
    return "ids"


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[
        Annotated[str, Tag("text")]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
        | Annotated[TokenIds, Tag("ids")]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("id_lists")],
        Discriminator(
            _prompt_kind,
            custom_error_type="prompt_type",
            custom_error_message=(
                "prompt must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists"
            ),
        ),
    ]
    max_tokens: int | None = None  # None: the adapter's default (16, as OpenAI's)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (lm-eval's loglikelihood): score the prompt, generate
        nothing (the engine generates one token, which the response leaves out)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        return completion_params(self.model_dump(exclude={"prompt"}))  # the adapter never reads it


class ChatMessage(_Base):
    role: Literal[ROLES]  # type: ignore[valid-type]
    # A string, or OpenAI's list of content parts ({"type": "text", "text": ...}).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # an assistant turn that called tools
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None  # a tool turn: which call it answers

    def to_template_dict(self, param: str = "messages[0]") -> dict[str, Any]:
        """The chat template's dict, through the engine's one OpenAI adapter (InputError for
        an unsupported content part)."""
        return template_message(self.model_dump(exclude_none=True), param)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model decides how many calls

    def to_sampling_params(self) -> SamplingParams:
        return chat_params(self.model_dump(exclude={"messages"}))


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# Responses ----------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
