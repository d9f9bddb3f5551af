"""`tokenmill generate` as an operator meets it: progress in a log file, bad paths refused before
the model loads (exit 3, one line, no traceback), the chat template applied by default."""

from __future__ import annotations

import json
import os
import re
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


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def generate_into_log(log: Path, *args: str, env=None) -> tuple[int, str]:
    """`tokenmill generate ARGS` in a real process whose output goes to a file, as under cron or
    SLURM (not a terminal); returns the exit code and the log's text."""
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "tokenmill", "generate", *args],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
            env=env,
        )
    return proc.returncode, log.read_text()


def test_log_progress_shows_finished_rows_and_rates_before_the_first_row_is_written(
    tiny_model_dir, tmp_path
):
    """Row 0 has the most work, so sorting queues it first and it finishes last: until then every
    other row is finished but none can be written. The log must say so, with live rates."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        f.write(json.dumps({"id": "r0", "prompt": "Once", "sampling": {"max_tokens": 400}}) + "\n")
        for i in range(1, 30):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"{i}: The quick brown fox"}) + "\n")
    code, text = generate_into_log(
        tmp_path / "job.log",
        str(inp),
        *("-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_model_dir)),
        *("--temperature", "0", "--max-tokens", "2", "--ignore-eos"),
        *("--progress-interval", "0"),
    )
    assert code == exit_codes.OK, text
    assert len(rows(tmp_path / "out.jsonl")) == 30
    line = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ rows finished (\d+)/30 \(\d+\.\d%\) written (\d+) "
        r"in (\d+) tok/s out (\d+) tok/s( eta \d+:\d\d:\d\d)?$"
    )
    progress = [line.match(s) for s in text.splitlines() if line.match(s)]
    assert progress, text
    before_first_write = [
        m for m in progress if int(m.group(2)) == 0 and int(m.group(1)) > 0 and m.group(5)
    ]
    assert before_first_write, text
    # Rows 1-29 finished while row 0 still runs, and the rates move.
    assert any(
        m.group(1) == "29" and int(m.group(3)) and int(m.group(4)) for m in before_first_write
    )
    assert progress[-1].group(1, 2) == ("30", "30")
    assert "\r" not in text and "\x1b[" not in text  # line-based: no bar redraws in a log


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the job gets as far as loading a model."""

    def load(_config):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr("tokenmill.io.job._default_llm", load)


def refused(*argv) -> str:
    result = runner.invoke(app, ["generate", *map(str, argv)])
    assert result.exit_code == exit_codes.CANNOT_RUN, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_paths_exit_3_with_one_line_before_the_model_loads(
    tiny_model_dir, tmp_path, no_model_load
):
    prompts = SAMPLES / "prompts.jsonl"
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder\n")
    msg = refused(prompts, "-o", afile / "out.jsonl", "--model", tiny_model_dir)
    assert f"{afile} is a file" in msg and "--output" in msg
    msg = refused(prompts, "-o", afile / "deeper" / "out.jsonl", "--model", tiny_model_dir)
    assert f"{afile} is a file" in msg

    msg = refused(prompts, "-o", "/proc/out.jsonl", "--model", tiny_model_dir)
    assert "cannot write in /proc" in msg and "--output" in msg

    (tmp_path / "dir.jsonl").mkdir()
    msg = refused(prompts, "-o", tmp_path / "dir.jsonl", "--model", tiny_model_dir)
    assert "is a folder" in msg

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)
    msg = refused(prompts, "-o", tmp_path / "a.jsonl", "--model", config_only)
    assert "tokenizer files" in msg and "tokenizer.json" in msg and "weights" in msg

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tokenizer)
    msg = refused(prompts, "-o", tmp_path / "b.jsonl", "--model", no_tokenizer)
    assert "tokenizer files" in msg and "weights" not in msg

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = refused(empty, "--model", tiny_model_dir)
    assert "has no rows" in msg
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert "has no rows" in refused(blank, "--model", tiny_model_dir)
    assert not (tmp_path / "empty.results.jsonl").exists()


def test_bad_output_path_in_a_real_process_prints_no_traceback(tiny_model_dir, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x\n")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "tokenmill", "generate", str(SAMPLES / "prompts.jsonl")),
            *("-o", str(afile / "out.jsonl"), "--model", str(tiny_model_dir)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == exit_codes.CANNOT_RUN
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot write {afile / 'out.jsonl'}: {afile} is a file, not a folder; "
        "choose another --output"
    ]


def generate(model, *args):
    argv = ["generate", *map(str, args), "--model", str(model), "-t", "0", "--max-tokens", "2"]
    result = runner.invoke(app, [*argv, "--quiet"], catch_exceptions=False)
    assert result.exit_code == exit_codes.OK, result.output
    return result


def test_plain_text_rows_go_through_the_chat_template_unless_no_chat(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    inp = SAMPLES / "prompts.jsonl"
    outs = {}
    for flag in ("", "--chat", "--no-chat"):
        out = tmp_path / f"out{flag}.jsonl"
        generate(tiny_model_dir, inp, "-o", out, *([flag] if flag else []))
        outs[flag] = rows(out)
    assert outs[""] == outs["--chat"]
    assert outs[""] != outs["--no-chat"]
    prompts = [r["prompt"] for r in rows(inp)]
    templated = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    want_chat = [len(tok(t, add_special_tokens=False).input_ids) for t in templated]
    want_raw = [len(tok(p).input_ids) for p in prompts]
    assert [r["prompt_tokens"] for r in outs[""]] == want_chat
    assert [r["prompt_tokens"] for r in outs["--no-chat"]] == want_raw


def test_gguf_conversion_in_a_log_has_no_progress_bar(tiny_model_dir, tmp_path, monkeypatch):
    """The one-off GGUF conversion's tqdm bar would be one huge carriage-return line in a log."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "engine"))  # test_loader's own imports

    spec = importlib.util.spec_from_file_location(
        "engine_test_loader", ROOT / "tests" / "engine" / "test_loader.py"
    )
    test_loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_loader)
    gguf_path = test_loader.write_llama_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "hello"}\n')
    code, text = generate_into_log(
        tmp_path / "job.log",
        *(str(inp), "--model", str(gguf_path), "--max-tokens", "2"),
        env={**os.environ, "TOKENMILL_CACHE": str(tmp_path / "cache")},
    )
    assert code == exit_codes.OK, text
    assert (tmp_path / "cache" / "gguf").is_dir()  # the conversion did run
    assert "\r" not in text and "it/s" not in text, text
