"""Progress: timestamped plain lines off a terminal, a rich bar on one; finished rows and written
rows counted apart, rates from the engine's live counter, the ETA from finished rows."""

from __future__ import annotations

import io
import re
import time

import pytest

from tokenmill.io.progress import Progress

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ rows finished (\d+)/10 \(\d+\.\d%\) written (\d+) "
    r"in (\d+) tok/s out (\d+) tok/s( eta \d+:\d\d:\d\d)?$"
)


def test_plain_lines_are_timestamped_and_spaced_by_the_interval():
    stream = io.StringIO()
    with Progress(10, interval_s=0.0, use_rich=False, stream=stream) as progress:
        for _ in range(3):
            progress.finish(prompt_tokens=5, output_tokens=7)
            progress.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 7  # one per call at interval 0, and one at the end
    assert all(LINE.match(line) for line in lines), lines
    counts = [tuple(int(g) for g in LINE.match(line).group(1, 2)) for line in lines]
    assert counts == [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (3, 3)]

    stream = io.StringIO()
    with Progress(10, interval_s=3600, use_rich=False, stream=stream) as progress:
        for _ in range(5):
            progress.finish(1, 1)
            progress.update(1)
    assert len(stream.getvalue().splitlines()) == 1  # only the final line


def test_finished_rows_show_before_any_row_is_written():
    """A sorted job finishes rows long before the first one in input order: the line must say so,
    with rates and an ETA, while `written` is still 0."""
    generated = [0]
    stream = io.StringIO()
    progress = Progress(
        10, use_rich=False, stream=stream, interval_s=0, generated_tokens=lambda: generated[0]
    )
    progress.t0 -= 2.0  # two seconds into the run
    generated[0] = 300
    for _ in range(4):
        progress.finish(prompt_tokens=25, output_tokens=50)
    m = LINE.match(stream.getvalue().splitlines()[-1])
    assert m is not None
    finished, written, tin, tout = (int(g) for g in m.group(1, 2, 3, 4))
    assert (finished, written) == (4, 0)
    assert tin == pytest.approx(100 / 2, rel=0.05)  # prompt tokens of finished rows
    assert tout == pytest.approx(300 / 2, rel=0.05)  # the engine's live count
    assert progress.eta_s() == pytest.approx(6 * 2.0 / 4, rel=0.05)  # 6 rows left at 2 rows/s
    assert m.group(5) is not None


def test_rates_use_the_engines_live_token_count_and_eta_counts_this_run_only():
    generated = [0]
    progress = Progress(
        10, done=4, use_rich=False, stream=io.StringIO(), generated_tokens=lambda: generated[0]
    )
    assert progress.eta_s() is None  # nothing finished in this run yet
    generated[0] = 1000
    progress.finish(prompt_tokens=50, output_tokens=3)
    progress.update(1, prompt_tokens=50, output_tokens=3)
    tin, tout = progress.rates()
    assert tout > tin > 0 and tout / tin == pytest.approx(1000 / 50)
    assert progress.finished == 5 and progress.written == 5
    eta = progress.eta_s()
    elapsed = time.monotonic() - progress.t0
    assert eta is not None and eta == pytest.approx(5 * elapsed, rel=0.2)  # 5 left, 1 this run
    assert Progress(None, use_rich=False).eta_s() is None


def test_written_rows_alone_still_count_as_finished():
    """A caller that reports only written rows (no finish()) gets the same figures as before."""
    progress = Progress(10, use_rich=False, stream=io.StringIO())
    progress.update(3, prompt_tokens=30, output_tokens=60)
    assert progress.finished == 3 and progress.prompt_tokens == 30 and progress.output_tokens == 60
    assert progress.rates()[1] > 0


def test_quiet_prints_nothing_and_rich_bar_runs():
    stream = io.StringIO()
    with Progress(3, interval_s=0, use_rich=False, stream=stream, enabled=False) as progress:
        progress.finish(1, 1)
        progress.update(3)
    assert stream.getvalue() == ""
    with Progress(3, use_rich=True) as progress:  # draws to the (captured) terminal
        progress.finish(10, 10)
        progress.update(2, 10, 10)
        progress.tick()
    assert progress.written == 2 and progress.finished == 2


def test_no_line_of_zeros_before_the_engine_has_done_anything():
    generated = [0]
    stream = io.StringIO()
    progress = Progress(
        10, use_rich=False, stream=stream, interval_s=0, generated_tokens=lambda: generated[0]
    )
    progress._last_tick = -1.0
    progress.tick()
    assert stream.getvalue() == ""
    generated[0] = 8
    progress._last_tick = -1.0
    progress.tick()
    (line,) = stream.getvalue().splitlines()
    assert LINE.match(line) and " out 0 tok/s" not in line
