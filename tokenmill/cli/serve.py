"""`tokenmill serve`: the OpenAI-compatible server over one engine."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenmill.cli import options as o

API_KEY_ENV = "TOKENMILL_API_KEY"


def serve(
    model: o.Model = o.ENGINE_DEFAULTS["model"],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind. The default, loopback, accepts only local clients; "
            "0.0.0.0 exposes the server to every network this machine is on."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/* (default: no key).",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model id clients send and /v1/models lists (default: --model)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="How to read tool calls in chat output for tool_choice auto: hermes (Qwen, "
            "Hermes) or llama3_json (Llama 3.1+). Without it, such requests are refused.",
        ),
    ] = None,
    dtype: o.Dtype = o.ENGINE_DEFAULTS["dtype"],
    device: o.Device = o.ENGINE_DEFAULTS["device"],
    max_model_len: o.MaxModelLen = o.ENGINE_DEFAULTS["max_model_len"],
    max_num_seqs: o.MaxNumSeqs = o.ENGINE_DEFAULTS["max_num_seqs"],
    max_num_batched_tokens: o.MaxNumBatchedTokens = o.ENGINE_DEFAULTS["max_num_batched_tokens"],
    kv_cache_memory: o.KvCacheMemory = o.ENGINE_DEFAULTS["kv_cache_memory"],
    gpu_memory_utilization: o.GpuMemoryUtilization = o.ENGINE_DEFAULTS["gpu_memory_utilization"],
    block_size: o.BlockSize = o.ENGINE_DEFAULTS["block_size"],
    enable_prefix_caching: o.EnablePrefixCaching = o.ENGINE_DEFAULTS["enable_prefix_caching"],
    enforce_eager: o.EnforceEager = o.ENGINE_DEFAULTS["enforce_eager"],
    seed: o.Seed = o.ENGINE_DEFAULTS["seed"],
    attention_backend: o.AttentionBackend = o.ENGINE_DEFAULTS["attention_backend"],
) -> None:
    """Serve a model over HTTP with OpenAI's API (completions, chat, models) plus /metrics."""
    config = o.engine_config_from(locals())
    from tokenmill.server.tools import TOOL_CALL_PARSERS

    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise typer.BadParameter(
            f"must be one of {', '.join(TOOL_CALL_PARSERS)}", param_hint="--tool-call-parser"
        )
    try:
        import uvicorn

        from tokenmill.server.app import build_app
    except ImportError as e:
        raise typer.BadParameter(
            f"serving needs the serve extra ({e.name} is missing): pip install 'tokenmill[serve]'"
        ) from e
    from tokenmill import LLM

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(
            f"warning: listening on {host} without an API key: anyone who can reach "
            f"this port can use the model. Set --api-key or {API_KEY_ENV}.",
            fg="yellow",
            err=True,
        )
    llm = LLM.from_config(config)
    app = build_app(
        llm,
        served_model_name=served_model_name or model,
        api_key=api_key or None,
        tool_call_parser=tool_call_parser,
    )
    typer.echo(f"tokenmill serving {app.state.model_name} on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
