"""Typer options shared by the subcommands, built from the config dataclasses.

Defaults and help text come from EngineConfig / SamplingParams fields, never written here.
The engine options are declared once, in ENGINE_OPTIONS; a command gets all of them with
`@with_engine_options()` and one `engine_options: EngineOptions = None` parameter where they
belong in its signature, and builds its EngineConfig with `engine_config(**engine_options)`.
Sampling options are the Annotated aliases below, passed to `sampling_params(...)`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any, TypeVar

import typer

from tokenmill.engine.config import EngineConfig, field_help
from tokenmill.engine.sampling_params import SamplingParams

_E = "Engine"
_S = "Sampling"


def _eopt(name: str, *flags: str):
    return typer.Option(*flags, help=field_help(EngineConfig, name), rich_help_panel=_E)


def _sopt(name: str, *flags: str):
    return typer.Option(*flags, help=_cli_help(SamplingParams, name), rich_help_panel=_S)


def _cli_help(cls: type, name: str) -> str:
    """A field's help without its "(None: ...)" note: the command line cannot pass None."""
    return re.sub(r"\s*\(None: [^)]*\)", "", field_help(cls, name))


# Engine options ---------------------------------------------------------------------------------
Model = Annotated[str | None, _eopt("model", "--model", "-m")]
Revision = Annotated[str | None, _eopt("revision", "--revision")]
DownloadDir = Annotated[str | None, _eopt("download_dir", "--download-dir")]
Dtype = Annotated[str, _eopt("dtype", "--dtype")]
Device = Annotated[str, _eopt("device", "--device")]
MaxModelLen = Annotated[int | None, _eopt("max_model_len", "--max-model-len")]
MaxNumSeqs = Annotated[int | None, _eopt("max_num_seqs", "--max-num-seqs")]
MaxNumBatchedTokens = Annotated[
    int | None, _eopt("max_num_batched_tokens", "--max-num-batched-tokens")
]
KvCacheMemory = Annotated[str | None, _eopt("kv_cache_memory", "--kv-cache-memory")]
GpuMemoryUtilization = Annotated[float, _eopt("gpu_memory_utilization", "--gpu-memory-utilization")]
BlockSize = Annotated[int, _eopt("block_size", "--block-size")]
EnablePrefixCaching = Annotated[
    bool, _eopt("enable_prefix_caching", "--enable-prefix-caching/--no-prefix-caching")
]
EnforceEager = Annotated[bool, _eopt("enforce_eager", "--enforce-eager")]
Seed = Annotated[int, _eopt("seed", "--seed")]
AttentionBackend = Annotated[str, _eopt("attention_backend", "--attention-backend")]
TensorParallelSize = Annotated[int, _eopt("tensor_parallel_size", "--tensor-parallel-size")]

# Not an engine field: torch's CPU threads belong to the process (see cli/threads.py).
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch (default: the CPUs this process may use, from its affinity "
        "mask and cgroup quota; OMP_NUM_THREADS wins when set).",
        rich_help_panel=_E,
        show_default=False,
    ),
]

# Every engine field but those set by commands, not by users, is an option.
_SET_BY_COMMANDS = ("skip_tokenizer_init", "load_format")
ENGINE_DEFAULTS = {
    f.name: f.default for f in fields(EngineConfig) if f.name not in _SET_BY_COMMANDS
}
# EngineConfig field -> its option, in --help order. A new engine field gets its option here
# (an alias above) and so on every command at once.
ENGINE_OPTIONS: dict[str, Any] = {
    "model": Model,
    "revision": Revision,
    "download_dir": DownloadDir,
    "dtype": Dtype,
    "device": Device,
    "max_model_len": MaxModelLen,
    "max_num_seqs": MaxNumSeqs,
    "max_num_batched_tokens": MaxNumBatchedTokens,
    "kv_cache_memory": KvCacheMemory,
    "gpu_memory_utilization": GpuMemoryUtilization,
    "block_size": BlockSize,
    "enable_prefix_caching": EnablePrefixCaching,
    "enforce_eager": EnforceEager,
    "seed": Seed,
    "attention_backend": AttentionBackend,
    "tensor_parallel_size": TensorParallelSize,
}
ENGINE_PARAM = "engine_options"
# What a command's `engine_options` parameter receives: EngineConfig field -> value.
EngineOptions = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])


def with_engine_options(**defaults: Any) -> Callable[[F], F]:
    """Give a Typer command every engine option of ENGINE_OPTIONS.

    The command declares `engine_options: EngineOptions = None` where the options go (its
    --help lists them there, in the Engine panel) and receives their values in that dict. An
    engine option the command declares itself (its own help or default) stays its own and is
    in the dict too. `defaults` changes an option's default for this command only.
    """

    def wrap(command: F) -> F:
        sig = inspect.signature(command, eval_str=True)
        if ENGINE_PARAM not in sig.parameters:
            raise TypeError(f"{command.__name__} needs an `{ENGINE_PARAM}` parameter")
        own = set(sig.parameters)
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=defaults.get(name, ENGINE_DEFAULTS[name]),
                annotation=alias,
            )
            for name, alias in ENGINE_OPTIONS.items()
            if name not in own
        ]
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            params.extend(added if p.name == ENGINE_PARAM else [p])
        names = {p.name for p in added}

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            engine = {k: values[k] for k in ENGINE_DEFAULTS if k in values}
            mine = {k: v for k, v in values.items() if k not in names}
            return command(**mine, **{ENGINE_PARAM: engine})

        run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run  # type: ignore[return-value]

    return wrap


# Sampling options -------------------------------------------------------------------------------
N = Annotated[int, _sopt("n", "--n")]
Temperature = Annotated[float, _sopt("temperature", "--temperature", "-t")]
TopP = Annotated[float, _sopt("top_p", "--top-p")]
TopK = Annotated[int, _sopt("top_k", "--top-k")]
MinP = Annotated[float, _sopt("min_p", "--min-p")]
PresencePenalty = Annotated[float, _sopt("presence_penalty", "--presence-penalty")]
FrequencyPenalty = Annotated[float, _sopt("frequency_penalty", "--frequency-penalty")]
RepetitionPenalty = Annotated[float, _sopt("repetition_penalty", "--repetition-penalty")]
SamplingSeed = Annotated[int | None, _sopt("seed", "--sampling-seed")]
Stop = Annotated[list[str] | None, _sopt("stop", "--stop")]
StopTokenIds = Annotated[list[int] | None, _sopt("stop_token_ids", "--stop-token-id")]
IncludeStopStrInOutput = Annotated[
    bool, _sopt("include_stop_str_in_output", "--include-stop-str-in-output")
]
IgnoreEos = Annotated[bool, _sopt("ignore_eos", "--ignore-eos")]
MaxTokens = Annotated[int | None, _sopt("max_tokens", "--max-tokens")]
MinTokens = Annotated[int, _sopt("min_tokens", "--min-tokens")]
Logprobs = Annotated[int | None, _sopt("logprobs", "--logprobs")]
SkipSpecialTokens = Annotated[
    bool, _sopt("skip_special_tokens", "--skip-special-tokens/--keep-special-tokens")
]

# Structured output: one of these builds SamplingParams.structured_outputs.
JsonSchema = Annotated[
    str | None,
    typer.Option(
        "--json-schema",
        help="Constrain every output to this JSON schema (a .json file); result rows get "
        "a `parsed` field.",
        rich_help_panel=_S,
    ),
]
Regex = Annotated[
    str | None,
    typer.Option("--regex", help="Constrain every output to match this regex.", rich_help_panel=_S),
]
Choice = Annotated[
    str | None,
    typer.Option(
        "--choice",
        help="Constrain every output to one of these comma-separated strings.",
        rich_help_panel=_S,
    ),
]

# Every sampling field is an option, except those with options of their own (structured
# output above) or set per row only; `seed` is spelled --sampling-seed (--seed is the engine's).
_NOT_OPTIONS = ("seed", "structured_outputs", "logit_bias", "prompt_logprobs")
SAMPLING_DEFAULTS = {
    f.name: f.default for f in fields(SamplingParams) if f.name not in _NOT_OPTIONS
}


def structured_outputs(
    json_schema: str | None = None, regex: str | None = None, choice: str | None = None
):
    """StructuredOutputsParams from --json-schema / --regex / --choice (at most one), or None."""
    import json
    from pathlib import Path

    from tokenmill.engine.sampling_params import StructuredOutputsParams

    given = [
        n
        for n, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice))
        if v
    ]
    if not given:
        return None
    if len(given) > 1:
        raise typer.BadParameter(f"pass one of {', '.join(given)}, not several")
    try:
        if json_schema is not None:
            path = Path(json_schema)
            if not path.is_file():
                raise typer.BadParameter(
                    f"{json_schema} is not a file; pass the path of a JSON schema file",
                    param_hint="--json-schema",
                )
            try:
                schema = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise typer.BadParameter(
                    f"{json_schema} is not valid JSON: {e}", param_hint="--json-schema"
                ) from e
            return StructuredOutputsParams(json=schema)
        if regex is not None:
            return StructuredOutputsParams(regex=regex)
        choices = [c.strip() for c in choice.split(",") if c.strip()]
        return StructuredOutputsParams(choice=choices)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=given[0]) from e


def engine_config(**values) -> EngineConfig:
    """EngineConfig from CLI values; raises typer.BadParameter with the config's message."""
    try:
        return EngineConfig(**values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def sampling_params(**values) -> SamplingParams:
    """SamplingParams from CLI values (`sampling_seed` maps to `seed`)."""
    if "sampling_seed" in values:
        values["seed"] = values.pop("sampling_seed")
    values = {k: v for k, v in values.items() if not (k in ("stop", "stop_token_ids") and not v)}
    try:
        return SamplingParams(**values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
