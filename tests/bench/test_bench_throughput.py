"""`tokenmill bench throughput` and its workloads."""

import json

from typer.testing import CliRunner

from tokenmill.bench.workloads import build_workload, nano_workload
from tokenmill.cli.app import app


def test_nano_workload_is_nano_vllms_draw():
    wl = nano_workload()
    assert len(wl.requests) == 256
    assert wl.num_prompt_tokens == 142_827  # shared/BENCHMARKS.md, workload W1
    assert wl.num_output_tokens == 133_966
    assert wl.temperature == 0.6 and wl.ignore_eos
    assert all(0 <= t <= 10_000 for r in wl.requests for t in r.prompt)


def test_random_workload_has_the_asked_shape():
    wl = build_workload("random", num_prompts=5, input_len=7, output_len=3)
    assert [len(r.prompt) for r in wl.requests] == [7] * 5
    assert wl.num_output_tokens == 15


def test_dataset_workload_reads_generate_inputs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    wl = build_workload("nano", dataset=str(path), output_len=4)  # --dataset wins
    assert [r.prompt for r in wl.requests] == ["hello", [{"role": "user", "content": "hi"}]]
    assert wl.num_prompt_tokens is None


def test_cli_runs_a_random_workload_and_writes_json(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "throughput",
            "--model",
            str(tiny_model_dir),
            "--workload",
            "random",
            "--input-len",
            "12",
            "--output-len",
            "5",
            "--num-prompts",
            "6",
            "--kv-cache-memory",
            "16MiB",
            "--bandwidth",
            "2",
            "--tflops",
            "3",
            "--output-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (ours,) = report["results"]
    assert report["floor"]["bandwidth"] == 2e12 and report["floor"]["flops_per_s"] == 3e12
    assert report["engine"]["eager_steps"] == report["engine"]["steps"]  # CPU: no graphs
    assert report["engine"]["kernel_compiles"] == 0  # CPU: no Triton compiles watched
    assert ours["num_requests"] == 6
    assert ours["prompt_tokens"] == 72 and ours["output_tokens"] == 30  # ignore_eos: exact
    assert ours["output_tokens_per_s"] > 0
    assert ours["kernel_compiles"] == []  # CPU path: nothing compiles
    assert report["workload"] == "random" and report["model"]["device"] == "cpu"
    assert "tokenmill" in result.output


def test_cli_dataset_with_chat_rows(tiny_model_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "throughput",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(path),
            "--output-len",
            "3",
            "--kv-cache-memory",
            "16MiB",
        ],
    )
    assert result.exit_code == 0, result.output


def test_cli_mixed_workload_with_sampling_prints_the_floor(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "throughput", "--model", str(tiny_model_dir), "--workload", "mixed"]
    args += ["--num-prompts", "1", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40"]
    args += ["--kv-cache-memory", "16MiB", "--output-json", str(out)]
    result = CliRunner().invoke(app, args)  # bandwidth and matmul rate measured on this CPU
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["workload"] == "mixed"
    assert report["sampling"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 40}
    (ours,) = report["results"]
    assert ours["prompt_tokens"] == 250 and ours["output_tokens"] == 155
    floor = report["floor"]
    assert floor["bandwidth"] > 0 and floor["flops_per_s"] > 0 and floor["decode_steps"] == 155
    assert ours["fraction_of_floor"] == floor["seconds"] / ours["seconds"]
    assert "fraction of floor: tokenmill 0." in result.output and "decode steps" in result.output
