"""The end-of-job report: OUTPUT.report.json and a rich summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report_path(output: Path) -> Path:
    return Path(str(output) + ".report.json")


def engine_figures(llm) -> dict[str, Any]:
    """Mean batch size, preemptions and prefix-cache hit rate from the engine's stats."""
    stats = getattr(llm, "stats", None)
    if stats is None:
        return {}
    steps = getattr(stats, "num_steps", 0) or 0
    figures: dict[str, Any] = {
        "steps": steps,
        "mean_batch_size": getattr(stats, "num_scheduled_seqs_total", 0) / steps if steps else 0.0,
        "preemptions": getattr(stats, "num_preemptions", 0),
    }
    queries = getattr(stats, "prefix_cache_queries", 0) or 0
    if queries:
        figures["prefix_cache_hit_rate"] = getattr(stats, "prefix_cache_hits", 0) / queries
    return figures


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def print_report(report: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"tokenmill generate: {report.get('output')}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = report["rows"]
    tokens = report["tokens"]
    run = report["this_run"]
    table.add_row("rows ok / failed", f"{rows['ok']:,} / {rows['failed']:,}")
    table.add_row("rows skipped (done by an earlier run)", f"{rows['skipped']:,}")
    table.add_row("prompt / generated tokens", f"{tokens['prompt']:,} / {tokens['generated']:,}")
    table.add_row("wall time (this run)", f"{run['wall_time_s']:.1f} s")
    tps = run["tokens_per_s"]
    table.add_row(
        "tokens/s in / out / total",
        f"{tps['input']:,.0f} / {tps['output']:,.0f} / {tps['total']:,.0f}",
    )
    table.add_row("requests/s", f"{run['requests_per_s']:.2f}")
    for key, value in report.get("engine", {}).items():
        table.add_row(
            key.replace("_", " "), f"{value:.3f}" if isinstance(value, float) else str(value)
        )
    table.add_row("model", f"{report.get('model')} ({report.get('dtype')}, {report.get('device')})")
    console.print(table)
