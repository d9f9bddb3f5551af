"""Every command's --help: a usage line naming its arguments, an Examples section, flags shown
without a value type, and no option that mentions a value the command line cannot take."""

from __future__ import annotations

import re
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from tokenmill.cli import options as o
from tokenmill.cli.app import app

COMMANDS = [["generate"], ["merge"], ["serve"], ["bench", "throughput"], ["bench", "serve"]]


def help_text(argv: list[str]) -> str:
    result = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_has_examples_and_plain_flags(argv):
    text = help_text(argv)
    assert "<bool>" not in text
    assert re.search(r"Examples\s*\n\s*tokenmill " + " ".join(argv) + " ", text), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage


def test_the_root_help_has_examples_too():
    assert re.search(r"Examples\s*\n\s*tokenmill generate ", help_text([]))


def test_usage_lines_name_the_arguments():
    assert re.search(r"Usage: \S+ generate \[OPTIONS\] INPUT\s*$", help_text(["generate"]), re.M)
    assert re.search(r"Usage: \S+ merge \[OPTIONS\] OUTPUTS\.\.\.\s*$", help_text(["merge"]), re.M)


def test_options_never_offer_what_the_command_line_cannot_take():
    text = help_text(["generate"])
    assert "None" not in text  # --max-tokens: "(None: up to the model's context)" is library-only
    for flag in ("--overwrite", "--fail-fast", "--quiet"):
        assert flag in text and f"--no-{flag[2:]}" not in text
    assert "--dummy-weights" in help_text(["bench", "throughput"])
    assert "--no-dummy-weights" not in help_text(["bench", "throughput"])


def test_both_benches_share_their_workload_defaults():
    from tokenmill.bench.workloads import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN

    for argv in (["bench", "throughput"], ["bench", "serve"]):
        text = re.sub(r"\s+", " ", help_text(argv).replace("│", " "))
        assert re.search(
            rf"--input-len <int> Prompt tokens [^\[]*\[default: {DEFAULT_INPUT_LEN}\]", text
        ), argv
        assert re.search(rf"--output-len <int> [^\[]*\[default: {DEFAULT_OUTPUT_LEN}\]", text), argv


def test_bench_throughput_warns_that_its_default_workload_is_slow_on_a_cpu(tmp_path):
    argv = ["bench", "throughput", "--device", "cpu", "--model", str(tmp_path / "missing")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code != 0  # no such model; the note comes before loading it
    assert "hours on a CPU" in result.stderr and "--num-prompts 16" in result.stderr
    result = CliRunner().invoke(app, [*argv, "--num-prompts", "4"])
    assert "hours on a CPU" not in result.stderr


ENGINE_COMMANDS = [["generate"], ["serve"], ["bench", "throughput"]]


@pytest.mark.parametrize("argv", ENGINE_COMMANDS, ids=" ".join)
def test_every_engine_option_is_on_every_engine_command(argv):
    # Declared once (cli/options.py ENGINE_OPTIONS), so no command can miss one (issue 9 §5).
    text = help_text(argv)
    for name in o.ENGINE_OPTIONS:
        assert f"--{name.replace('_', '-')}" in text.replace("--no-prefix-caching", ""), name


def test_engine_options_reach_the_command_as_one_dict():
    seen = {}

    @o.with_engine_options(block_size=8)
    def cmd(
        name: str = "x",
        engine_options: o.EngineOptions = None,
        seed: Annotated[int, typer.Option(help="my own seed")] = 5,
    ) -> None:
        seen.update(name=name, seed=seed, engine=engine_options)

    app_ = typer.Typer()
    app_.command()(cmd)
    argv = ["--name", "y", "--max-num-seqs", "3", "--no-prefix-caching", "-m", "/m"]
    result = CliRunner().invoke(app_, argv)
    assert result.exit_code == 0, result.output
    engine = seen["engine"]
    assert (seen["name"], seen["seed"], engine["seed"]) == ("y", 5, 5)  # its own option stays
    assert (engine["max_num_seqs"], engine["enable_prefix_caching"], engine["model"]) == (
        3,
        False,
        "/m",
    )
    assert engine["block_size"] == 8 and engine["dtype"] == o.ENGINE_DEFAULTS["dtype"]
    assert set(engine) == set(o.ENGINE_OPTIONS)
    assert "my own seed" in CliRunner().invoke(app_, ["--help"]).output
