"""Tool calls for /v1/chat/completions: OpenAI `tools` / `tool_choice` on top of the engine.

    tool_choice       what the engine does                     how tool_calls are read
    "none"            plain chat (tools still in the template)  not at all
    "auto" (default)  plain chat                                the --tool-call-parser's format
    "required"        JSON constraint: [{"name", "parameters"}] the JSON array itself
    {"function": f}   JSON constraint: f's parameters schema    the whole text is the arguments

"required" and a named function need no parser: the constraint makes the arguments parse
every time (vLLM does the same). "auto" needs a parser for the model family's format:
  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Qwen 2.5 / 3, Hermes)
  llama3_json  {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, several
               separated by ";"  (Llama 3.1+)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


class ToolError(ValueError):
    """A tools / tool_choice request the server cannot serve; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index  # stream deltas number their tool calls
        return out


@dataclass
class ToolPlan:
    """How one request uses its tools: the constraint to decode with and how to read calls."""

    mode: str  # "none" | "auto" | "required" | "named"
    functions: dict[str, dict[str, Any]]  # name -> its OpenAI function object
    parser: str | None = None
    named: str | None = None
    constraint: StructuredOutputsParams | None = None

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        """`tools` for the chat template (the OpenAI shape most templates expect)."""
        return [{"type": "function", "function": f} for f in self.functions.values()]

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished completion's text."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return None, [ToolCall(self.named, _compact(text))]
        if self.mode == "required":
            try:
                calls = json.loads(text)
            except ValueError:
                return text, []  # cut short by max_tokens: give the text back
            return None, [ToolCall(c["name"], json.dumps(c["parameters"])) for c in calls]
        return parse_tool_calls(text, self.parser, set(self.functions))


def plan_tools(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parser: str | None
) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` and pick the mode; ToolError says what is wrong."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError(
                'each tool must be {"type": "function", "function": {"name": ...}}', f"tools[{i}]"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError("a function needs a name", f"tools[{i}].function.name")
        functions[fn["name"]] = fn
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", functions)
    if choice == "auto":
        if parser is None:
            raise ToolError(
                "tools with tool_choice auto need a tool-call parser; start the server with "
                f"--tool-call-parser ({' or '.join(TOOL_CALL_PARSERS)}), or pass tool_choice "
                '"required" or a named function',
                "tools",
            )
        return ToolPlan("auto", functions, parser=parser)
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": _params(fn)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, fn in functions.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        return ToolPlan("required", functions, constraint=StructuredOutputsParams(json=schema))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise ToolError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in functions:
        raise ToolError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    constraint = StructuredOutputsParams(json=_params(functions[name]))
    return ToolPlan("named", functions, named=name, constraint=constraint)


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(
    text: str, parser: str | None, names: set[str]
) -> tuple[str | None, list[ToolCall]]:
    """Tool calls in free model text (tool_choice auto); text that holds none is content."""
    if parser == "hermes":
        calls = []
        for m in _HERMES.finditer(text):
            call = _call(m.group(1), "arguments", names)
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = text[: text.find("<tool_call>")].strip()
        return content or None, calls
    if parser == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in _split_json_objects(body):
            call = _call(part, "parameters", names) or _call(part, "arguments", names)
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    raise ValueError(f"unknown tool-call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")


def _call(blob: str, args_key: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(blob)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or args_key not in obj:
        return None
    args = obj[args_key]
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def _split_json_objects(body: str) -> list[str]:
    """'{...}; {...}' -> ['{...}', '{...}'] (a ';' inside a string is left alone)."""
    decoder = json.JSONDecoder()
    parts, i = [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except ValueError:
            return [body]  # not a sequence of objects: let the caller reject it
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return parts
