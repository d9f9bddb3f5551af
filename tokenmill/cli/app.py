"""The `tokenmill` command: a Typer app; each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer

from tokenmill import __version__
from tokenmill.cli import threads
from tokenmill.cli.help import EXAMPLES, add_examples, examples, fix_typer_help

app = typer.Typer(
    name="tokenmill",
    help="Run language models over prompt datasets: generate, bench, serve, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    epilog=examples(*EXAMPLES[""]),
)

# Each module defines `register(app)`. Imports stay inside the commands, so `tokenmill --help`
# does not import torch.
SUBCOMMAND_MODULES = ("generate", "merge", "bench", "serve")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tokenmill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """tokenmill: a paged-attention inference engine for batch jobs and serving."""


for _name in SUBCOMMAND_MODULES:
    try:
        _module = importlib.import_module(f"tokenmill.cli.{_name}")
    except ModuleNotFoundError as _e:  # a subcommand still being written
        if _e.name != f"tokenmill.cli.{_name}":
            raise
        continue
    _module.register(app)
add_examples(app)
fix_typer_help()


def main() -> None:
    _quiet_bars_off_terminal()
    threads.prefer_passive_wait()
    app(prog_name="tokenmill")


def _quiet_bars_off_terminal() -> None:
    """tqdm bars (the one-off GGUF conversion, datasets) redraw with carriage returns, one huge
    line in a log file; off a terminal they are switched off (TQDM_DISABLE, read by tqdm)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")
