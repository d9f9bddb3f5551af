"""`tokenmill generate` end to end on a tiny random model (CPU, greedy, few tokens)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_data"
runner = CliRunner()


def generate(model, *args, input=None):
    argv = [
        "generate",
        *map(str, args),
        "--model",
        str(model),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--quiet",
    ]
    return runner.invoke(app, argv, input=input, catch_exceptions=False)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The greedy results of sample_data/prompts.jsonl."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    result = generate(tiny_model_dir, SAMPLES / "prompts.jsonl", "-o", out)
    assert result.exit_code == exit_codes.OK, result.output
    return rows(out)


def test_reference_rows_are_complete(reference):
    source = rows(SAMPLES / "prompts.jsonl")
    assert [r["id"] for r in reference] == [s["id"] for s in source]
    assert all(r["error"] is None and r["output_tokens"] == 4 for r in reference)
    assert all(r["finish_reason"] == "length" for r in reference)


def test_every_input_format_gives_the_same_results(tiny_model_dir, reference, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(SAMPLES / "prompts.parquet")
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 20), tmp_path / "pq" / "a.parquet")
    pq.write_table(table.slice(20), tmp_path / "pq" / "b.parquet")
    datasets.Dataset.from_list(table.to_pylist()).save_to_disk(str(tmp_path / "saved"))
    inputs = {
        "parquet": SAMPLES / "prompts.parquet",
        "parquet_dir": tmp_path / "pq",
        "saved_hf": tmp_path / "saved",
    }
    want = [(r["id"], r["text"], r["prompt_tokens"]) for r in reference]
    for name, spec in inputs.items():
        out = tmp_path / f"{name}.jsonl"
        result = generate(tiny_model_dir, spec, "-o", out)
        assert result.exit_code == exit_codes.OK, (name, result.output)
        assert [(r["id"], r["text"], r["prompt_tokens"]) for r in rows(out)] == want, name
    out = tmp_path / "stdin.jsonl"
    result = generate(tiny_model_dir, "-", "-o", out, input=(SAMPLES / "prompts.jsonl").read_text())
    assert result.exit_code == exit_codes.OK, result.output
    assert [(r["id"], r["text"], r["prompt_tokens"]) for r in rows(out)] == want


def test_sorting_does_not_change_results(tiny_model_dir, reference, tmp_path):
    out = tmp_path / "nosort.jsonl"
    assert (
        generate(
            tiny_model_dir, SAMPLES / "prompts.jsonl", "-o", out, "--no-sort", "--window-rows", "7"
        ).exit_code
        == 0
    )
    assert [r["text"] for r in rows(out)] == [r["text"] for r in reference]


def test_chat_rows_use_the_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "chat.jsonl"
    assert generate(tiny_model_dir, SAMPLES / "chat.jsonl", "-o", out).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for src, res in zip(rows(SAMPLES / "chat.jsonl"), rows(out), strict=True):
        text = tok.apply_chat_template(src["messages"], tokenize=False, add_generation_prompt=True)
        assert res["prompt_tokens"] == len(tok(text, add_special_tokens=False).input_ids)
        assert res["id"] == src["id"] and res["error"] is None


def test_chat_flag_sends_text_prompts_through_the_chat_template(tiny_model_dir, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "a", "prompt": "What is the capital of France?"}\n')
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}]}\n'
    )
    out_flag, out_msgs = tmp_path / "flag.jsonl", tmp_path / "msgs.jsonl"
    assert generate(tiny_model_dir, src, "--chat", "-o", out_flag).exit_code == 0
    assert generate(tiny_model_dir, msgs, "-o", out_msgs).exit_code == 0
    assert rows(out_flag) == rows(out_msgs)
    plain = tmp_path / "plain.jsonl"
    assert generate(tiny_model_dir, src, "--no-chat", "-o", plain).exit_code == 0
    assert rows(plain)[0]["prompt_tokens"] < rows(out_flag)[0]["prompt_tokens"]


def test_openai_batch_file_runs_unchanged(tiny_model_dir, tmp_path):
    # /v1/completions lines are raw completions: compare with plain rows sent without a template.
    reference = tmp_path / "raw.jsonl"
    assert (
        generate(tiny_model_dir, SAMPLES / "prompts.jsonl", "--no-chat", "-o", reference).exit_code
        == 0
    )
    reference = rows(reference)
    inp = tmp_path / "batch.jsonl"
    lines = rows(SAMPLES / "openai_batch.jsonl")
    lines[0]["body"]["logprobs"] = 2
    lines[1]["body"].update(logprobs=True, top_logprobs=2)
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "batch.results.jsonl"
    assert generate(tiny_model_dir, inp, "-o", out).exit_code == 0
    results = rows(out)
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    by_prompt = {r["id"]: r for r in reference}
    for line, res in zip(lines, results, strict=True):
        assert set(res) == {"id", "custom_id", "response", "error"} and res["error"] is None
        resp = res["response"]
        assert resp["status_code"] == 200 and resp["request_id"]
        body = resp["body"]
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        reasons = [c["finish_reason"] for c in body["choices"]]
        # the line's own max_tokens (32) applies, not the command line's 4
        assert usage["completion_tokens"] <= line["body"]["max_tokens"]
        assert reasons != ["length"] or usage["completion_tokens"] == line["body"]["max_tokens"]
        if line["url"] == "/v1/completions":
            assert body["object"] == "text_completion"
            # temperature 0 in the line: the same text as the greedy plain run, extended
            ref = by_prompt[f"p{int(line['custom_id'].split('-')[1]):03d}"]
            assert body["choices"][0]["text"].startswith(ref["text"])
        else:
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["role"] == "assistant"
    lp = results[0]["response"]["body"]["choices"][0]["logprobs"]
    # top_logprobs maps token text -> logprob, so two byte tokens that print alike may collapse
    assert len(lp["tokens"]) == 32 and all(1 <= len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and all(x <= 0 for x in lp["token_logprobs"])
    chat_lp = results[1]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(chat_lp) == 32 and all(len(c["top_logprobs"]) == 2 for c in chat_lp)


def test_bad_rows_give_error_rows_and_exit_codes(tiny_model_dir, tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "The quick brown fox"}),
                "{not json",
                json.dumps({"question": "where is the prompt?"}),
                json.dumps({"prompt": "x", "sampling": {"top_p": 2}}),
                json.dumps({"prompt": ""}),
                json.dumps({"prompt": "Paged attention stores keys " * 20}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "bad.results.jsonl"
    result = generate(tiny_model_dir, inp, "-o", out, "--max-model-len", "40")
    assert result.exit_code == exit_codes.ROW_ERRORS
    got = rows(out)
    assert [r["error"] and r["error"]["type"] for r in got] == [
        None,
        "invalid_json",
        "missing_prompt",
        "invalid_sampling",
        "empty_prompt",
        "prompt_too_long",
    ]
    assert "--max-model-len" in got[5]["error"]["message"]
    assert len(rows(tmp_path / "bad.results.errors.jsonl")) == 5
    result = generate(tiny_model_dir, inp, "-o", tmp_path / "ff.jsonl", "--fail-fast")
    assert result.exit_code == exit_codes.FAIL_FAST
    assert len(rows(tmp_path / "ff.jsonl")) == 2


def test_could_not_run_and_usage_exit_codes(tiny_model_dir, tmp_path):
    assert generate(tiny_model_dir, tmp_path / "missing.jsonl").exit_code == exit_codes.CANNOT_RUN
    assert (
        generate(
            tmp_path / "no-model", SAMPLES / "chat.jsonl", "-o", tmp_path / "x.jsonl"
        ).exit_code
        == exit_codes.CANNOT_RUN
    )
    assert (
        generate(tiny_model_dir, SAMPLES / "chat.jsonl", "--shard", "3/3").exit_code
        == exit_codes.USAGE
    )
    assert (
        generate(tiny_model_dir, SAMPLES / "chat.jsonl", "--top-p", "3").exit_code
        == exit_codes.USAGE
    )


def test_default_output_report_and_plain_progress(tiny_model_dir, tmp_path):
    inp = tmp_path / "chat.jsonl"
    shutil.copy(SAMPLES / "chat.jsonl", inp)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill",
            "generate",
            str(inp),
            "--model",
            str(tiny_model_dir),
            "--temperature",
            "0",
            "--max-tokens",
            "3",
            "--progress-interval",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "chat.results.jsonl"
    assert len(rows(out)) == 10
    assert any(
        line[:4].isdigit() and "rows finished 10/10 (100.0%) written 10" in line
        for line in proc.stderr.splitlines()
    )
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["rows"] == {"ok": 10, "failed": 0, "skipped": 0, "total": 10}
    assert report["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in rows(out))
    assert report["tokens"]["generated"] == 30
    assert report["model"] == str(tiny_model_dir) and report["device"] == "cpu"
    assert report["engine"]["mean_batch_size"] > 1
    assert "generate" in report["command_line"]


def test_shards_then_merge_equal_the_unsharded_run(tiny_model_dir, reference, tmp_path):
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"part{i}.jsonl")
        result = generate(
            tiny_model_dir, SAMPLES / "prompts.jsonl", "--shard", f"{i}/3", "-o", shards[-1]
        )
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.jsonl"
    result = runner.invoke(app, ["merge", *map(str, shards), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert rows(merged) == reference
