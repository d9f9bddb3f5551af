"""`tokenmill generate --json-schema | --regex | --choice`, per-row constraints and OpenAI
batch `response_format`, on a tiny random model (whose free output never fits a constraint)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_data"
# sample_data/person.schema.json with short strings: a random model fills strings to the limit
SCHEMA = json.loads((SAMPLES / "person.schema.json").read_text())
for _prop in ("name", "city", "job"):
    SCHEMA["properties"][_prop]["maxLength"] = 4
runner = CliRunner()


def generate(model, *args):
    argv = ["generate", *map(str, args), "--model", str(model), "--quiet"]
    argv += ["--temperature", "0.8", "--sampling-seed", "1", "--max-tokens", "64"]
    return runner.invoke(app, argv, catch_exceptions=False)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_json_schema_rows_parse_and_validate(tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    src = SAMPLES / "extract.jsonl"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    result = generate(
        tiny_model_dir,
        src,
        "--json-schema",
        schema,
        "-o",
        out,
        "--limit",
        "40",
        "--keep-columns",
        "answer",
    )
    assert result.exit_code == exit_codes.OK, result.output
    got = rows(out)
    assert len(got) == 40
    num_stopped = 0
    for r in got:
        assert r["answer"] is not None
        if r["finish_reason"] == "length":  # a string ran out of tokens: no value
            assert r["parsed"] is None
            continue
        num_stopped += 1
        assert r["parsed"] == json.loads(r["text"])
        jsonschema.validate(r["parsed"], SCHEMA)
    assert num_stopped >= 30


@pytest.mark.parametrize(
    "flag,value,ok",
    [
        ("--choice", "cat, dog ,bird", lambda t: t in ("cat", "dog", "bird")),
        (
            "--regex",
            r"[A-Z][a-z]{2,5} [0-9]{2}",
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", t),
        ),
    ],
)
def test_choice_and_regex(tiny_model_dir, tmp_path, flag, value, ok):
    out = tmp_path / "out.jsonl"
    result = generate(tiny_model_dir, SAMPLES / "prompts.jsonl", flag, value, "-o", out)
    assert result.exit_code == exit_codes.OK, result.output
    got = rows(out)
    assert got and all(r["finish_reason"] == "stop" and ok(r["text"]) for r in got)
    assert all("parsed" not in r for r in got)


def test_per_row_constraints_override_the_job(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt": "Pick one."},
        {"id": "b", "prompt": "Digits.", "sampling": {"structured_outputs": {"regex": "[0-9]{4}"}}},
        {"id": "c", "prompt": "JSON.", "sampling": {"structured_outputs": {"json": SCHEMA}}},
        {"id": "d", "prompt": "Bad.", "sampling": {"structured_outputs": {"regex": "a(b"}}},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    result = generate(tiny_model_dir, src, "--choice", "yes,no", "-o", out)
    assert result.exit_code == exit_codes.ROW_ERRORS, result.output
    a, b, c, d = rows(out)
    assert a["text"] in ("yes", "no")
    assert re.fullmatch("[0-9]{4}", b["text"])
    if c["finish_reason"] == "stop":
        jsonschema.validate(c["parsed"], SCHEMA)
    assert "parsed" in c
    assert d["error"]["type"] == "invalid_sampling" and "regex" in d["error"]["message"]


def test_openai_batch_response_format(tiny_model_dir, tmp_path):
    body = {
        "messages": [{"role": "user", "content": "Describe a person."}],
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
    }
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i in range(4)
    ]
    lines.append(
        {
            "custom_id": "obj",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "{", "max_tokens": 8, "response_format": {"type": "json_object"}},
        }
    )
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    assert generate(tiny_model_dir, src, "-o", out).exit_code == exit_codes.OK
    got = rows(out)
    for r in got[:4]:
        choice = r["response"]["body"]["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert sum(r["response"]["body"]["choices"][0]["finish_reason"] == "stop" for r in got[:4]) >= 2
    assert got[4]["response"]["body"]["choices"][0]["text"].startswith("{")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--choice", "a", "--regex", "b"], "not several"),
        (["--json-schema", "missing.json"], "not a file"),
        (["--regex", "a(b"], "invalid structured_outputs.regex"),
    ],
)
def test_bad_constraint_flags_exit_2(tiny_model_dir, tmp_path, args, words):
    result = generate(tiny_model_dir, SAMPLES / "prompts.jsonl", *args, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 2
    assert words in " ".join(result.output.split())
