"""How `--help` reads: an Examples section per command, flags without a value type, and
`INPUT` (not `{input}`) in the usage line.

Typer >= 0.29 prints a `<type>` for every parameter, `<bool>` included, as if a flag took a
value, and writes a required argument as `{input}` in the usage line. `fix_typer_help()` keeps
its rich layout and changes only those two things; on Typer versions without those methods it
does nothing.
"""

from __future__ import annotations

# Command path -> example command lines, shown under each command's --help.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": (
        "tokenmill generate prompts.jsonl -t 0  # the batch job",
        "tokenmill serve  # an OpenAI-compatible server",
        "tokenmill generate --help  # every command has its own examples",
    ),
    "generate": (
        "tokenmill generate prompts.jsonl  # -> prompts.results.jsonl beside the input",
        "tokenmill generate prompts.jsonl -t 0 --max-tokens 128 -o out/results.jsonl",
        "tokenmill generate data.parquet -o results.parquet --model ./my-checkpoint",
        "tokenmill generate prompts.jsonl --no-chat  # raw text, no chat template",
        "tokenmill generate big.jsonl --shard 0/8 -o part0.jsonl  # then: tokenmill merge",
        "cat prompts.jsonl | tokenmill generate - -o results.jsonl",
        "tokenmill generate s3://bucket/prompts.jsonl -o s3://bucket/out/results.parquet",
    ),
    "merge": (
        "tokenmill merge part0.jsonl part1.jsonl part2.jsonl -o results.jsonl",
        "tokenmill merge out/*.shard-*.results.jsonl -o results.parquet",
        "tokenmill merge s3://bucket/out/part0.jsonl s3://bucket/out/part1.jsonl -o "
        "s3://bucket/results.jsonl",
    ),
    "serve": (
        "tokenmill serve  # the default model on http://127.0.0.1:8000/v1",
        "tokenmill serve --model ./my-checkpoint --port 8080",
        "TOKENMILL_API_KEY=secret tokenmill serve --host 0.0.0.0",
    ),
    "bench throughput": (
        "tokenmill bench throughput --num-prompts 16 --output-len 32 --workload random "
        "--input-len 128  # minutes on a CPU",
        "tokenmill bench throughput --dummy-weights --arch qwen3-0.6b  # a GPU: no checkpoint",
        "tokenmill bench throughput --model ./my-checkpoint --peer hf",
    ),
    "bench serve": (
        "tokenmill bench serve --url http://127.0.0.1:8000 --num-prompts 64",
        "tokenmill bench serve --url http://127.0.0.1:8000 --request-rate 4 --max-concurrency 16",
    ),
}


def examples(*commands: str) -> str:
    """A command's epilog: an Examples heading and one command line per entry.

    An entry may end in `  # comment`; square brackets are escaped (rich markup).
    """
    lines = ["[bold]Examples[/bold]"]
    lines += ["  " + c.replace("[", r"\[") for c in commands]
    return "\n".join(lines)


def add_examples(app, prefix: str = "") -> None:
    """Give every registered command (and sub-app command) without an epilog its EXAMPLES."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        lines = EXAMPLES.get(f"{prefix}{name}")
        if lines and info.epilog is None:
            info.epilog = examples(*lines)
    for group in app.registered_groups:
        add_examples(group.typer_instance, f"{prefix}{group.name} ")


def fix_typer_help() -> None:
    try:
        from typer.core import TyperArgument, TyperOption
    except ImportError:  # pragma: no cover - very old Typer
        return
    if hasattr(TyperOption, "display_type_rich") and not getattr(TyperOption, "_tm_fixed", False):
        show_type = TyperOption.display_type_rich

        def display_type_rich(self, ctx):
            return None if self.is_flag else show_type(self, ctx)

        TyperOption.display_type_rich = display_type_rich
        TyperOption._tm_fixed = True
    if hasattr(TyperArgument, "_usage_display_name"):

        def usage_name(self) -> str:
            name = (self.metavar or self.name or "").upper()
            if self.nargs != 1:
                name += "..."
            return name if self.required else f"[{name}]"

        TyperArgument._usage_display_name = usage_name
