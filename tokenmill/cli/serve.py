"""`tokenmill serve`: the OpenAI-compatible server over one engine core."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import typer

from tokenmill.cli import options as o
from tokenmill.engine.config import field_help
from tokenmill.server.limits import ServerLimits

API_KEY_ENV = "TOKENMILL_API_KEY"
_L = "Server limits"
LIMIT_DEFAULTS = {f.name: f.default for f in fields(ServerLimits)}


def _limit_help(name: str) -> str:
    return field_help(ServerLimits, name)


@o.with_engine_options()
def serve(
    engine_options: o.EngineOptions = None,  # every engine option (cli/options.py), listed first
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
            help="Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
            "(default: no key).",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model id clients send and /v1/models lists (default: --model)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    engine_process: Annotated[
        bool,
        typer.Option(
            "--engine-process/--in-process-engine",
            help="Run the scheduler and model in their own process (default), so HTTP, "
            "tokenizing and streaming never share a GIL with the engine; "
            "--in-process-engine keeps them on a thread of the server process.",
        ),
    ] = True,
    max_request_bytes: Annotated[
        int, typer.Option(help=_limit_help("max_request_bytes"), rich_help_panel=_L)
    ] = LIMIT_DEFAULTS["max_request_bytes"],
    max_prompt_bytes: Annotated[
        int | None, typer.Option(help=_limit_help("max_prompt_bytes"), rich_help_panel=_L)
    ] = LIMIT_DEFAULTS["max_prompt_bytes"],
    shutdown_timeout: Annotated[
        float, typer.Option(help=_limit_help("shutdown_timeout_s"), rich_help_panel=_L)
    ] = LIMIT_DEFAULTS["shutdown_timeout_s"],
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="How to read tool calls in chat output for tool_choice auto: hermes (Qwen, "
            "Hermes) or llama3_json (Llama 3.1+). Without it, such requests are refused.",
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP with OpenAI's API (completions, chat, models) plus /metrics."""
    config = o.engine_config(**engine_options)
    from tokenmill.server.tools import TOOL_CALL_PARSERS

    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise typer.BadParameter(
            f"must be one of {', '.join(TOOL_CALL_PARSERS)}", param_hint="--tool-call-parser"
        )
    try:
        import uvicorn

        from tokenmill.engine.gc_heap import freeze_startup_heap
        from tokenmill.server.app import build_app
        from tokenmill.server.async_engine import AsyncEngine
        from tokenmill.server.shutdown import GracefulServer
    except ImportError as e:
        raise typer.BadParameter(
            f"serving needs {e.name}, which is missing; reinstall tokenmill (pip install -e .) "
            "or pip install fastapi uvicorn"
        ) from e
    try:
        limits = ServerLimits(max_request_bytes, max_prompt_bytes, shutdown_timeout)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(
            f"warning: listening on {host} without an API key: anyone who can reach "
            f"this port can use the model. Set --api-key or {API_KEY_ENV}.",
            fg="yellow",
            err=True,
        )
    if engine_process:
        engine = AsyncEngine.in_process(config, max_prompt_bytes=max_prompt_bytes)
    else:
        from tokenmill import LLM

        engine = AsyncEngine.in_thread(LLM.from_config(config), max_prompt_bytes=max_prompt_bytes)
    app = build_app(
        engine,
        served_model_name=served_model_name or config.model,
        api_key=api_key,
        limits=limits,
        tool_call_parser=tool_call_parser,
    )
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            # A backstop: by then GracefulServer has ended every request through the engine.
            timeout_graceful_shutdown=shutdown_timeout + 5,
        ),
        engine,
        shutdown_timeout,
    )
    died: list[str] = []

    def on_dead(message: str) -> None:  # the engine core stopped: stop serving, exit non-zero
        died.append(message)
        server.should_exit = True

    engine.on_dead = on_dead
    freeze_startup_heap()  # after the tokenizer and the app are built (engine/gc_heap.py)
    typer.echo(f"tokenmill serving {app.state.model_name} on http://{host}:{port}/v1", err=True)
    server.run()
    if died:
        typer.secho(f"error: {died[0]}; the server stopped", fg="red", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
