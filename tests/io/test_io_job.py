"""The batch job's plumbing with a fake engine that finishes rows out of order."""

from __future__ import annotations

import json

import pytest
from io_fakes import FakeEngine, fake_text

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io import exit_codes
from tokenmill.io.job import JobConfig, errors_path, run_job
from tokenmill.io.journal import load_journal
from tokenmill.io.merge import MergeError, merge_outputs
from tokenmill.io.report import report_path
from tokenmill.io.shard import Shard, parse_shard
from tokenmill.io.writers import iter_output_rows

GREEDY = SamplingParams(temperature=0, max_tokens=3)


def make_prompts(path, num, words=lambda i: 1 + (i * 7) % 11):
    with open(path, "w") as f:
        for i in range(num):
            f.write(
                json.dumps({"id": f"r{i}", "prompt": " ".join(f"w{i}" for _ in range(words(i)))})
                + "\n"
            )
    return path


def run(tmp_path, input_path, engine=None, **kw):
    engine = engine or FakeEngine()
    cfg = JobConfig(
        input=str(input_path),
        output=str(kw.pop("output", tmp_path / "out.jsonl")),
        sampling=kw.pop("sampling", GREEDY),
        quiet=True,
        **kw,
    )
    return run_job(cfg, lambda _: engine), engine


def rows_of(path):
    return list(iter_output_rows(path))


def test_input_order_is_kept_while_the_engine_finishes_out_of_order(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 200)
    code, engine = run(tmp_path, inp, window_rows=32)
    assert code == exit_codes.OK
    out = rows_of(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(200)]
    assert [int(i) for i in engine.finish_order] != sorted(int(i) for i in engine.finish_order)
    tok = engine.tokenizer
    for i, r in enumerate(out):
        ids = tok(f"w{i}")["input_ids"] * (1 + (i * 7) % 11)
        assert r["text"] == fake_text(ids, 0, 3) and r["prompt_tokens"] == len(ids)
    # Memory bound: never more than two windows of rows queued at once.
    assert engine.max_unfinished < 2 * 32


def test_sorting_changes_the_queue_order_not_the_results(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 60)
    _, sorted_engine = run(tmp_path, inp, window_rows=60, output=tmp_path / "a.jsonl")
    _, plain_engine = run(tmp_path, inp, window_rows=60, sort=False, output=tmp_path / "b.jsonl")
    assert plain_engine.added == [str(i) for i in range(60)]
    assert sorted(sorted_engine.added) == sorted(plain_engine.added)
    lengths = [1 + (int(i) * 7) % 11 for i in sorted_engine.added]
    assert lengths[0] == max(lengths)  # the longest work is queued first
    assert rows_of(tmp_path / "a.jsonl") == rows_of(tmp_path / "b.jsonl")


def test_each_kind_of_bad_row_becomes_an_error_row(tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": "fine row"}),
        '{"prompt": "broken',
        json.dumps({"question": "no prompt column"}),
        json.dumps({"prompt": "bad override", "sampling": {"temperature": -1}}),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": " ".join(["long"] * 80)}),  # fake context is 64 tokens
        json.dumps({"prompt": "another fine row"}),
    ]
    inp.write_text("\n".join(lines) + "\n")
    code, _ = run(tmp_path, inp)
    assert code == exit_codes.ROW_ERRORS
    out = rows_of(tmp_path / "out.jsonl")
    assert [r["index"] for r in out] == list(range(7))
    types = [r["error"] and r["error"]["type"] for r in out]
    assert types == [
        None,
        "invalid_json",
        "missing_prompt",
        "invalid_sampling",
        "empty_prompt",
        "prompt_too_long",
        None,
    ]
    for r in out[1:6]:
        assert r["error"]["message"].startswith(f"line {r['line']}: ")
    errors = rows_of(errors_path(tmp_path / "out.jsonl"))
    assert [e["index"] for e in errors] == [1, 2, 3, 4, 5]
    report = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert report["rows"] == {"ok": 2, "failed": 5, "skipped": 0, "total": 7}


def test_token_id_rows_get_the_engines_own_prompt_checks(tmp_path):
    """The batch job checks rows with the engine's InputProcessor (engine/input_processor.py):
    ids outside the vocabulary are a row error here, as they are a 400 under `serve`."""

    class SmallVocab(FakeEngine):
        def model_info(self):
            return {**super().model_info(), "vocab_size": 100}

    inp = tmp_path / "in.jsonl"
    rows = [{"prompt": [5, 6, 7]}, {"prompt": [5, 100]}, {"prompt": [1] * 70}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, engine = run(tmp_path, inp, engine=SmallVocab())
    assert code == exit_codes.ROW_ERRORS
    out = rows_of(tmp_path / "out.jsonl")
    assert [r["error"] and r["error"]["type"] for r in out] == [
        None,
        "invalid_row",
        "prompt_too_long",
    ]
    assert "outside the vocabulary [0, 100): [100]" in out[1]["error"]["message"]
    assert "--max-model-len" in out[2]["error"]["message"]
    assert engine.added == ["0"]


def test_fail_fast_stops_at_the_first_bad_row(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 50)
    with open(inp, "a") as f:
        f.write("not json\n")
        for i in range(50):
            f.write(json.dumps({"prompt": f"tail {i}"}) + "\n")
    code, engine = run(tmp_path, inp, fail_fast=True, window_rows=20)
    assert code == exit_codes.FAIL_FAST
    out = rows_of(tmp_path / "out.jsonl")
    assert out[-1]["error"]["type"] == "invalid_json" and len(out) == 51
    assert not engine.unfinished


def test_report_totals_add_up_and_n_gives_lists(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 30)
    code, engine = run(
        tmp_path,
        inp,
        sampling=SamplingParams(n=2, max_tokens=2, temperature=0.5),
        keep_columns=("id",),
    )
    assert code == exit_codes.OK
    out = rows_of(tmp_path / "out.jsonl")
    assert all(isinstance(r["text"], list) and len(r["text"]) == 2 for r in out)
    report = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert report["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in out)
    assert report["tokens"]["generated"] == sum(r["output_tokens"] for r in out)
    assert report["tokens"]["generated"] == engine.stats.num_generated_tokens
    assert report["rows"]["ok"] == 30 == report["this_run"]["rows"]
    run_ = report["this_run"]
    assert run_["tokens_per_s"]["total"] == pytest.approx(
        run_["tokens_per_s"]["input"] + run_["tokens_per_s"]["output"]
    )
    assert report["engine"]["steps"] == engine.stats.num_steps
    for key in ("model", "dtype", "device", "command_line", "sampling"):
        assert key in report


def test_resume_refused_when_the_sampling_changed_unless_overwrite(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 10)
    assert run(tmp_path, inp)[0] == exit_codes.OK
    assert run(tmp_path, inp)[0] == exit_codes.OK  # already complete: nothing to do
    assert "already complete" in capsys.readouterr().err
    changed = SamplingParams(temperature=0, max_tokens=4)
    assert run(tmp_path, inp, sampling=changed)[0] == exit_codes.CANNOT_RUN
    assert "different sampling" in capsys.readouterr().err
    assert run(tmp_path, inp, sampling=changed, overwrite=True)[0] == exit_codes.OK
    assert load_journal(tmp_path / "out.jsonl").fingerprint["sampling"]["max_tokens"] == 4


def test_output_that_is_not_ours_or_is_the_input_is_refused(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 3)
    (tmp_path / "out.jsonl").write_text("precious\n")
    assert run(tmp_path, inp)[0] == exit_codes.CANNOT_RUN
    assert (tmp_path / "out.jsonl").read_text() == "precious\n"
    assert run(tmp_path, inp, output=inp)[0] == exit_codes.CANNOT_RUN


class _StopAfter(FakeEngine):
    """Stops the job (as SIGTERM would) once `after` rows have finished."""

    def __init__(self, job_ref, after):
        super().__init__()
        self.job_ref, self.after = job_ref, after

    def step(self):
        outs = super().step()
        if len(self.finish_order) >= self.after:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return outs


def test_sigterm_stops_cleanly_and_the_rerun_completes_exactly_once(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 120)
    run(tmp_path, inp, window_rows=25, output=tmp_path / "ref.jsonl")
    code, engine = run(tmp_path, inp, engine=_StopAfter(None, 40), window_rows=25)
    assert code == exit_codes.INTERRUPTED
    partial = rows_of(tmp_path / "out.jsonl")
    assert 0 < len(partial) < 120 and not engine.unfinished
    assert load_journal(tmp_path / "out.jsonl").rows_done == len(partial)
    code, _ = run(tmp_path, inp, window_rows=25)
    assert code == exit_codes.OK
    assert rows_of(tmp_path / "out.jsonl") == rows_of(tmp_path / "ref.jsonl")
    report = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert report["rows"]["skipped"] == len(partial) and report["rows"]["ok"] == 120


def test_torn_last_line_after_a_crash_is_cut_off_on_resume(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 40)
    run(tmp_path, inp, output=tmp_path / "ref.jsonl")
    run(tmp_path, inp, engine=_StopAfter(None, 15), window_rows=10)
    with open(tmp_path / "out.jsonl", "ab") as f:
        f.write(b'{"id": "r99", "ind')  # a write the crash interrupted
    assert run(tmp_path, inp, window_rows=10)[0] == exit_codes.OK
    assert rows_of(tmp_path / "out.jsonl") == rows_of(tmp_path / "ref.jsonl")


def test_parquet_output_resumes_and_matches_jsonl(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 50)
    run(tmp_path, inp, output=tmp_path / "ref.jsonl")
    out = tmp_path / "out.parquet"
    assert (
        run(tmp_path, inp, engine=_StopAfter(None, 20), output=out, window_rows=10, commit_s=0)[0]
        == exit_codes.INTERRUPTED
    )
    assert not out.exists() and any((tmp_path / "out.parquet.parts").iterdir())
    assert run(tmp_path, inp, output=out, window_rows=10)[0] == exit_codes.OK
    assert not (tmp_path / "out.parquet.parts").exists()
    assert rows_of(out) == rows_of(tmp_path / "ref.jsonl")


def test_shards_then_merge_equal_the_unsharded_run(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 31)
    run(tmp_path, inp, output=tmp_path / "whole.jsonl")
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.jsonl")
        assert run(tmp_path, inp, shard=Shard(i, 3), output=shards[-1])[0] == exit_codes.OK
        assert all(r["index"] % 3 == i for r in rows_of(shards[-1]))
    merge_outputs(shards[::-1], tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    merge_outputs(shards, tmp_path / "merged.parquet")
    assert rows_of(tmp_path / "merged.parquet") == rows_of(tmp_path / "whole.jsonl")
    with pytest.raises(MergeError, match="shard\\(s\\) 1/3 are missing"):
        merge_outputs([shards[0], shards[2]], tmp_path / "m.jsonl")
    with pytest.raises(MergeError, match="given twice"):
        merge_outputs([shards[0], shards[0], shards[1]], tmp_path / "m.jsonl")
    report_path(shards[1]).unlink()  # without reports, gaps are still found
    report_path(shards[0]).unlink()
    with pytest.raises(MergeError, match="rows missing: 2, 5, 8"):
        merge_outputs([shards[0], shards[1]], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_shard_parsing_and_slurm_defaults():
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard(None, {}) == Shard(0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard(None, env) == Shard(2, 4)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)


class _CrashAfter(FakeEngine):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def step(self):
        if len(self.finish_order) >= self.after:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().step()


def test_an_engine_crash_saves_the_finished_rows_and_exits_could_not_run(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 60)
    run(tmp_path, inp, output=tmp_path / "ref.jsonl")
    code, _ = run(tmp_path, inp, engine=_CrashAfter(25), window_rows=10)
    assert code == exit_codes.CANNOT_RUN
    assert "rerun the same command to resume" in capsys.readouterr().err
    done = load_journal(tmp_path / "out.jsonl").rows_done
    assert 0 < done == len(rows_of(tmp_path / "out.jsonl"))
    assert run(tmp_path, inp, window_rows=10)[0] == exit_codes.OK
    assert rows_of(tmp_path / "out.jsonl") == rows_of(tmp_path / "ref.jsonl")
