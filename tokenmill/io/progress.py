"""Progress of a batch job: a rich bar on a terminal, timestamped lines otherwise (cron, SLURM).

Two row counts, because they differ a lot on a sorted job: rows *finished* (the engine is done
with them, or they failed) and rows *written* (released to the output in input order). Sorting
finishes rows long before the rows ahead of them, so `written` can sit at 0 for most of a window
while `finished` climbs. The ETA and the input rate come from finished rows; the output rate
from the engine's live generated-token counter, so it moves from the first step.

    2026-11-29T11:30:00Z rows finished 120/400 (30.0%) written 40 in 512 tok/s out 1034 tok/s \
    eta 0:01:35                                   (one line)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone


class Progress:
    """Call `finish(...)` per finished row, `update(rows)` per written row, `tick()` per engine
    step; it redraws or prints at its own pace."""

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
        self.start_done = done  # rows done by earlier runs (resume)
        self.written = done
        self._finished = done
        # Tokens of rows finished in this run (finish()) and of rows written (update()); a caller
        # that only reports written rows still gets rates from those.
        self._finished_tokens = [0, 0]
        self._written_tokens = [0, 0]
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

    @property
    def finished(self) -> int:
        """Rows finished: written, or done by the engine and waiting for earlier rows."""
        return max(self._finished, self.written)

    @property
    def done(self) -> int:  # the name earlier callers used for written rows
        return self.written

    @property
    def prompt_tokens(self) -> int:
        return max(self._finished_tokens[0], self._written_tokens[0])

    @property
    def output_tokens(self) -> int:
        return max(self._finished_tokens[1], self._written_tokens[1])

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
                TextColumn("finished, {task.fields[written]}"),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "rows", total=self.total, completed=self.finished, written="", rates=""
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif self.enabled:
            self._print_line()

    def finish(self, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """One row finished (ok or failed); it is written later, in input order."""
        self._finished += 1
        self._finished_tokens[0] += prompt_tokens
        self._finished_tokens[1] += output_tokens
        self._show()

    def update(self, rows: int = 0, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """`rows` rows were written to the output."""
        self.written += rows
        self._written_tokens[0] += prompt_tokens
        self._written_tokens[1] += output_tokens
        self._show()

    def tick(self) -> None:
        """Called after every engine step: redraw or print, at most a few times a second."""
        now = time.monotonic()
        if now - self._last_tick >= 0.25:
            self._last_tick = now
            self._show()

    def rates(self) -> tuple[float, float]:
        """Input and output tokens per second over this run."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        out = self.generated_tokens() if self.generated_tokens is not None else 0
        return self.prompt_tokens / elapsed, max(out, self.output_tokens) / elapsed

    def eta_s(self) -> float | None:
        """Seconds left at this run's pace of finished rows (None before the first one)."""
        rows = self.finished - self.start_done
        if self.total is None or rows <= 0:
            return None
        return max(self.total - self.finished, 0) * (time.monotonic() - self.t0) / rows

    def line(self) -> str:
        """The plain progress line (without its timestamp)."""
        tin, tout = self.rates()
        total = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.finished / self.total:.1f}%)" if self.total else ""
        eta = self.eta_s()
        eta_text = f" eta {_hms(eta)}" if eta is not None else ""
        return (
            f"rows finished {self.finished}{total}{pct} written {self.written} "
            f"in {tin:.0f} tok/s out {tout:.0f} tok/s{eta_text}"
        )

    def _show(self) -> None:
        if self._bar is not None:
            self._refresh()
        elif (
            self.enabled
            and time.monotonic() - self._last_line >= self.interval_s
            and self._has_news()
        ):
            self._print_line()

    def _has_news(self) -> bool:
        """Something moved since the start (a line of zeros says nothing)."""
        generated = self.generated_tokens() if self.generated_tokens is not None else 0
        return generated > 0 or self.finished > self.start_done

    def _refresh(self) -> None:
        tin, tout = self.rates()
        self._bar.update(
            self._task,
            completed=self.finished,
            written=f"written {self.written}",
            rates=f"in {tin:,.0f} tok/s  out {tout:,.0f} tok/s",
        )

    def _print_line(self) -> None:
        self._last_line = time.monotonic()
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{stamp} {self.line()}", file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
