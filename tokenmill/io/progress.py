"""Progress of a batch job: a rich bar on a terminal, timestamped lines otherwise (cron, SLURM).

Both show rows done / total (when known), input and output tokens/s and the ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone


class Progress:
    """Call `update(...)` as often as you like; it redraws or prints at its own pace."""

    def __init__(
        self,
        total: int | None,
        done: int = 0,
        interval_s: float = 30.0,
        use_rich: bool | None = None,
        stream=None,
        enabled: bool = True,
        generated_tokens: Callable[[], int] | None = None,
    ):
        self.total = total
        self.start_done = done
        self.done = done
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.interval_s = interval_s
        # Live count of generated tokens (the engine's), so rates move before rows finish.
        self.generated_tokens = generated_tokens
        self._last_tick = 0.0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.use_rich = sys.stdout.isatty() if use_rich is None else use_rich
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled and self.use_rich:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("[bold]generate"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("rows", total=self.total, completed=self.done, rates="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif self.enabled:
            self._print_line()

    def update(self, rows: int = 0, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.done += rows
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        if self._bar is not None:
            self._refresh()
        elif self.enabled and time.monotonic() - self._last_line >= self.interval_s:
            self._print_line()

    def tick(self) -> None:
        """Called after every engine step: redraw or print, at most a few times a second."""
        now = time.monotonic()
        if now - self._last_tick >= 0.25:
            self._last_tick = now
            self.update()

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        out = self.generated_tokens() if self.generated_tokens is not None else self.output_tokens
        return self.prompt_tokens / elapsed, out / elapsed

    def eta_s(self) -> float | None:
        rows = self.done - self.start_done
        if self.total is None or rows <= 0:
            return None
        return (self.total - self.done) * (time.monotonic() - self.t0) / rows

    def _refresh(self) -> None:
        tin, tout = self.rates()
        self._bar.update(
            self._task, completed=self.done, rates=f"in {tin:,.0f} tok/s  out {tout:,.0f} tok/s"
        )

    def _print_line(self) -> None:
        self._last_line = time.monotonic()
        tin, tout = self.rates()
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        total = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        eta = self.eta_s()
        eta_text = f" eta {eta:.0f}s" if eta is not None else ""
        print(
            f"{stamp} rows {self.done}{total}{pct} in {tin:.0f} tok/s out {tout:.0f} tok/s"
            f"{eta_text}",
            file=self.stream,
            flush=True,
        )
