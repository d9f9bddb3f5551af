"""Progress: timestamped plain lines off a terminal, a rich bar on one."""

from __future__ import annotations

import io
import re

import pytest

from tokenmill.io.progress import Progress

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ rows (\d+)/10 \(\d+\.\d%\) in \d+ tok/s "
    r"out \d+ tok/s( eta \d+s)?$"
)


def test_plain_lines_are_timestamped_and_spaced_by_the_interval():
    stream = io.StringIO()
    with Progress(10, interval_s=0.0, use_rich=False, stream=stream) as progress:
        for _ in range(3):
            progress.update(1, prompt_tokens=5, output_tokens=7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # one per update at interval 0, and one at the end
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 2, 3, 3]

    stream = io.StringIO()
    with Progress(10, interval_s=3600, use_rich=False, stream=stream) as progress:
        for _ in range(5):
            progress.update(1)
    assert len(stream.getvalue().splitlines()) == 1  # only the final line


def test_rates_use_the_engines_live_token_count_and_eta_counts_this_run_only():
    generated = [0]
    progress = Progress(
        10, done=4, use_rich=False, stream=io.StringIO(), generated_tokens=lambda: generated[0]
    )
    generated[0] = 1000
    progress.update(2, prompt_tokens=50, output_tokens=3)
    tin, tout = progress.rates()
    assert tout > tin > 0 and tout / tin == pytest.approx(1000 / 50)
    assert progress.eta_s() is not None and progress.eta_s() > 0  # 4 rows left, 2 done so far
    assert Progress(None, use_rich=False).eta_s() is None


def test_quiet_prints_nothing_and_rich_bar_runs():
    stream = io.StringIO()
    with Progress(3, interval_s=0, use_rich=False, stream=stream, enabled=False) as progress:
        progress.update(3)
    assert stream.getvalue() == ""
    with Progress(3, use_rich=True) as progress:  # draws to the (captured) terminal
        progress.update(2, 10, 10)
        progress.tick()
    assert progress.done == 2
