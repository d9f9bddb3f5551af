"""OUTPUT.spill: finished rows survive until the output holds them, torn records are dropped."""

from __future__ import annotations

from tokenmill.io import spill as spill_module
from tokenmill.io.spill import FinishedRow, Spill, spill_path


def row(position: int) -> FinishedRow:
    return FinishedRow(position, {"id": f"r{position}", "text": "x" * 50}, True, 3, 4)


def test_rows_at_or_after_rows_done_are_replayed_and_the_rest_dropped(tmp_path):
    out = tmp_path / "out.jsonl"
    spill = Spill(out)
    assert spill.open(0) == {}
    for p in (5, 1, 3, 0, 2):
        spill.add(row(p))
    spill.forget_below(2)  # 0 and 1 are in the output now
    spill.close()
    replayed = Spill(out).open(2)
    assert sorted(replayed) == [2, 3, 5]
    assert replayed[5].out == row(5).out and replayed[5].replayed


def test_a_torn_last_record_is_dropped_and_the_file_compacted(tmp_path):
    out = tmp_path / "out.jsonl"
    spill = Spill(out)
    spill.open(0)
    for p in range(4):
        spill.add(row(p))
    spill.close()
    data = spill_path(out).read_bytes()
    spill_path(out).write_bytes(data[:-7])  # a write cut by a crash
    again = Spill(out)
    assert sorted(again.open(0)) == [0, 1, 2]
    assert spill_path(out).stat().st_size < len(data) - 7 + 1
    again.close()


def test_nothing_waiting_truncates_and_dead_weight_is_rewritten(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    spill = Spill(out)
    spill.open(0)
    for p in range(3):
        spill.add(row(p))
    spill.forget_below(3)
    assert spill_path(out).stat().st_size == 0
    monkeypatch.setattr(spill_module, "_COMPACT_MIN_BYTES", 0)
    for p in range(3, 40):
        spill.add(row(p))
    spill.forget_below(30)  # 10 live records, 27 dead: rewritten with the live ones only
    spill.add(row(40))
    spill.close()
    assert sorted(Spill(out).open(0)) == list(range(30, 41))
