"""`tokenmill generate --ray` on a local Ray instance (CPU, tiny model, greedy): its rows equal the
single-process job's row for row, through Ray's readers, one engine actor and the file sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_data"
runner = CliRunner()

EXTRA_LINES = [
    "",  # blank lines are skipped but still count for `line`
    "not json",
    '{"id": "x1", "topic": "no prompt"}',
    '{"id": "x2", "prompt": "Numbers: 0 1 2 3", "sampling": {"max_tokens": 2}}',
    '{"id": "x3", "prompt": "Once upon a time", "sampling": {"bogus": 1}}',
    '{"custom_id": "oa-1", "method": "POST", "url": "/v1/completions", '
    '"body": {"prompt": "What is the capital of France?", "max_tokens": 3, "temperature": 0}}',
    '{"custom_id": "oa-2", "method": "POST", "url": "/v1/chat/completions", "body": '
    '{"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3, "temperature": 0}}',
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One small local Ray instance for the module (generate --ray joins it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def generate(model, *args):
    argv = ["generate", *map(str, args), "--model", str(model), "--temperature", "0"]
    argv += ["--max-tokens", "4", "--quiet"]
    return runner.invoke(app, argv, catch_exceptions=False)


def part_rows(directory: Path) -> list[dict]:
    """Rows of a --ray output directory, parts in name order (which is input order)."""
    parts = sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".parquet"))
    assert parts, f"no part files in {directory}"
    rows = []
    for part in parts:
        if part.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(part).to_pylist()
        else:
            rows += [json.loads(line) for line in part.read_text().splitlines()]
    return rows


def file_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    """OpenAI batch rows carry a wall-clock `created`; everything else must match exactly."""
    for row in rows:
        body = (row.get("response") or {}).get("body")
        if body is not None:
            body.pop("created", None)
    return rows


def test_ray_jsonl_job_equals_the_single_process_job(tiny_model_dir, tmp_path):
    src = tmp_path / "mixed.jsonl"
    lines = (SAMPLES / "prompts.jsonl").read_text().splitlines()[:12]
    lines += (SAMPLES / "chat.jsonl").read_text().splitlines()[:3] + EXTRA_LINES
    src.write_text("\n".join(lines) + "\n")
    common = ("--keep-columns", "topic")
    single = tmp_path / "single.jsonl"
    result = generate(tiny_model_dir, src, "-o", single, *common)
    assert result.exit_code == exit_codes.ROW_ERRORS, result.output
    out = tmp_path / "ray.jsonl"
    result = generate(tiny_model_dir, src, "-o", out, "--ray", "--ray-batch-size", "5", *common)
    assert result.exit_code == exit_codes.ROW_ERRORS, result.output
    assert out.is_dir()
    want = comparable(file_rows(single))
    assert len(want) == len(lines) - 1  # every non-blank line, errors included
    assert comparable(part_rows(out)) == want
    assert sum(r["error"] is not None for r in want) == 3
    assert len(list(out.iterdir())) > 1  # several batches -> several parts, still in order

    merged = tmp_path / "merged.jsonl"
    parts = sorted(out.iterdir())
    result = runner.invoke(app, ["merge", *map(str, parts), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert comparable(file_rows(merged)) == want


def test_ray_parquet_job_equals_the_single_process_job(tiny_model_dir, tmp_path):
    src = SAMPLES / "prompts.parquet"
    common = ("--limit", "20", "--keep-columns", "topic")
    single = tmp_path / "single.parquet"
    assert generate(tiny_model_dir, src, "-o", single, *common).exit_code == exit_codes.OK
    out = tmp_path / "ray.parquet"
    result = generate(tiny_model_dir, src, "-o", out, "--ray", "--ray-batch-size", "8", *common)
    assert result.exit_code == exit_codes.OK, result.output
    want = file_rows(single)
    assert len(want) == 20 and all(r["error"] is None for r in want)
    assert part_rows(out) == want

    # No resume under Ray: a second run refuses to mix its parts into the first run's.
    result = generate(tiny_model_dir, src, "-o", out, "--ray", *common)
    assert result.exit_code == exit_codes.CANNOT_RUN
    assert "--overwrite" in result.output
    assert part_rows(out) == want


def test_processor_plugs_into_a_users_own_dataset(tiny_model_dir, tmp_path):
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.sampling_params import SamplingParams
    from tokenmill.ray import ProcessorConfig, build_processor

    prompts = [json.loads(line) for line in (SAMPLES / "prompts.jsonl").read_text().splitlines()]
    prompts = prompts[:6]
    single = tmp_path / "single.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert generate(tiny_model_dir, src, "-o", single).exit_code == exit_codes.OK
    config = ProcessorConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        sampling=SamplingParams(temperature=0, max_tokens=4),
        batch_size=3,
    )
    ds = build_processor(config)(ray.data.from_items(prompts))
    got = sorted(ds.take_all(), key=lambda r: r["id"])
    want = file_rows(single)
    assert [(r["id"], r["text"], r["prompt_tokens"]) for r in got] == [
        (r["id"], r["text"], r["prompt_tokens"]) for r in want
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--shard", "1/2"), "drop --shard 1/2"),
        (("--fail-fast",), "--fail-fast is not supported with --ray"),
    ],
)
def test_ray_refuses_options_it_cannot_honour(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "o.jsonl"
    result = generate(tiny_model_dir, SAMPLES / "prompts.jsonl", "-o", out, "--ray", *args)
    assert result.exit_code == exit_codes.CANNOT_RUN
    assert message in result.output
    assert not out.exists()


def test_ray_says_which_inputs_it_reads(tiny_model_dir, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("hello\n")
    result = generate(tiny_model_dir, src, "-o", tmp_path / "o.jsonl", "--ray")
    assert result.exit_code == exit_codes.CANNOT_RUN
    assert "--ray reads a .jsonl file, a .parquet file or a directory" in result.output
