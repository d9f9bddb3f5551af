"""The end-of-job report counts empty completions and warns about them."""

from __future__ import annotations

import json

from io_fakes import FakeEngine

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io import exit_codes
from tokenmill.io.job import JobConfig, run_job
from tokenmill.io.report import report_path


class EmptyEveryThirdRow(FakeEngine):
    """Rows whose request id is a multiple of 3 come back with no text (EOS first)."""

    def step(self):
        outs = super().step()
        for out in outs:
            if int(out.request_id) % 3 == 0:
                for c in out.outputs:
                    c.text, c.token_ids = "", []
        return outs


def test_empty_completions_are_counted_and_warned_about(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"w{i} x y"}) + "\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    config = JobConfig(
        input=str(inp),
        output=str(out),
        sampling=SamplingParams(temperature=0, max_tokens=3, n=2),
        quiet=True,
    )
    assert run_job(config, lambda _: EmptyEveryThirdRow()) == exit_codes.OK
    report = json.loads(report_path(out).read_text())
    assert report["empty_completions"] == 2 * 4  # rows 0, 3, 6, 9; two completions each
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "8 completions" in warnings[0] and "--no-chat" in warnings[0]

    out2 = tmp_path / "out2.jsonl"
    config.output = str(out2)
    assert run_job(config, lambda _: FakeEngine()) == exit_codes.OK
    assert json.loads(report_path(out2).read_text())["empty_completions"] == 0
    assert "warning" not in capsys.readouterr().err
