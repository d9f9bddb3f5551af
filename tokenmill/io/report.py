"""The end-of-job report: OUTPUT.report.json and a rich summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def report_path(output: Path) -> Path:
    return Path(str(output) + ".report.json")


_COUNTERS = (
    "num_steps",
    "num_generated_tokens",  # live, for the progress line's output rate
    "num_scheduled_seqs_total",
    "num_preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
)


def stats_snapshot(llm) -> dict[str, Any]:
    """The engine's counters now, to report a later run's figures as differences."""
    stats = getattr(llm, "stats", None)
    return {k: getattr(stats, k, 0) or 0 for k in _COUNTERS} if stats is not None else {}


def engine_figures(llm, since: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steps, mean batch size, preemptions and prefix-cache hit rate of the engine's stats,
    counted from the snapshot `since` (the engine may have run before, e.g. a warm-up)."""
    now = stats_snapshot(llm)
    if not now:
        return {}
    d = {k: now[k] - (since or {}).get(k, 0) for k in _COUNTERS}
    steps = d["num_steps"]
    figures: dict[str, Any] = {
        "steps": steps,
        "mean_batch_size": d["num_scheduled_seqs_total"] / steps if steps else 0.0,
        "preemptions": d["num_preemptions"],
    }
    if d["prefix_cache_queries"]:
        figures["prefix_cache_hit_rate"] = d["prefix_cache_hits"] / d["prefix_cache_queries"]
    return figures


def build_report(
    config,
    output: Path,
    llm,
    state,
    skipped: int,
    wall_s: float,
    stats0: dict[str, Any],
    totals0: dict[str, int],
    stop_reason: str | None,
    errors_file: str | None,
) -> dict[str, Any]:
    """OUTPUT.report.json: rows, tokens, this run's rates, engine figures, model, sampling."""
    t = state.totals
    run_rows = (t.rows_ok + t.rows_failed) - (totals0["rows_ok"] + totals0["rows_failed"])
    run_in = t.prompt_tokens - totals0["prompt_tokens"]
    run_out = t.output_tokens - totals0["output_tokens"]
    info = llm.model_info()
    report = {
        "output": str(output),
        "input": config.input,
        "finished": state.finished,
        "stopped_by": stop_reason,
        "shard": str(config.shard),
        "rows": {
            "ok": t.rows_ok,
            "failed": t.rows_failed,
            "skipped": skipped,
            "total": t.rows_ok + t.rows_failed,
        },
        "empty_completions": getattr(t, "empty_completions", 0),
        "tokens": {
            "prompt": t.prompt_tokens,
            "generated": t.output_tokens,
            "total": t.prompt_tokens + t.output_tokens,
        },
        "this_run": {
            "rows": run_rows,
            "prompt_tokens": run_in,
            "generated_tokens": run_out,
            "wall_time_s": wall_s,
            "tokens_per_s": {
                "input": run_in / wall_s,
                "output": run_out / wall_s,
                "total": (run_in + run_out) / wall_s,
            },
            "requests_per_s": run_rows / wall_s,
        },
        "engine": engine_figures(llm, since=stats0),
        "model": info.get("model"),
        "dtype": info.get("dtype"),
        "device": info.get("device"),
        "data_parallel_size": info.get("data_parallel_size", 1),
        "cpu_threads": _torch_threads(),
        "sampling": config.sampling.to_dict(),
        "window_rows": config.window_rows,
        "sorted": config.sort,
        "runs": state.runs,
        "errors_file": errors_file,
        "command_line": config.command_line,
    }
    return report


def report_warnings(report: dict[str, Any]) -> list[str]:
    """What an operator should look at before using the results."""
    warnings = []
    empty = report.get("empty_completions") or 0
    if empty:
        warnings.append(
            f"{empty:,} completions (of {report['rows']['ok']:,} ok rows) are empty: the model "
            "stopped at once; "
            "instruct models need their chat template (applied by default; --no-chat turns it "
            "off), and --min-tokens N forces some output"
        )
    return warnings


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # never imported here just to ask
    return torch.get_num_threads() if torch is not None else None


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
    if report.get("empty_completions"):
        table.add_row("empty completions", f"{report['empty_completions']:,}")
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
    if report.get("device") == "cpu" and report.get("cpu_threads"):
        table.add_row("cpu threads", str(report["cpu_threads"]))
    console.print(table)
