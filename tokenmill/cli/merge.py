"""`tokenmill merge OUTPUTS... -o FINAL`: join `generate --shard` outputs in input order."""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def merge(
    outputs: Annotated[
        list[str],
        typer.Argument(
            help="Shard outputs of tokenmill generate (.jsonl or .parquet; paths or URLs such as "
            "s3://bucket/out.jsonl), in any order.",
            show_default=False,
            metavar="OUTPUTS",
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Merged file, .jsonl or .parquet (a path or URL).",
            show_default=False,
        ),
    ],
) -> None:
    """Join shard outputs in input order; refuse (exit 5) if a row is missing or duplicated."""
    from tokenmill.io import exit_codes
    from tokenmill.io.merge import MergeError, merge_outputs

    try:
        result = merge_outputs(list(outputs), output)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(exit_codes.MERGE_MISMATCH) from None
    except (ValueError, OSError) as e:  # bad extension, unreadable row, a store's refusal
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(exit_codes.CANNOT_RUN) from None
    print(
        f"merged {len(outputs)} files into {output}: {result.rows} rows "
        f"({result.failed_rows} error rows)",
        file=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    app.command("merge", no_args_is_help=True)(merge)
