"""`tokenmill bench throughput` (offline speed) and `tokenmill bench serve` (a live server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenmill.bench.workloads import DEFAULT_INPUT_LEN, DEFAULT_NUM_PROMPTS, DEFAULT_OUTPUT_LEN
from tokenmill.cli import options as o

bench_app = typer.Typer(help="Measure throughput and latency.", no_args_is_help=True)

WorkloadOpt = Annotated[
    str,
    typer.Option(
        "--workload",
        help="nano (nano-vllm's bench.py draw: 256 requests, about 143k prompt and 134k output "
        "tokens; hours on a CPU), random, or dataset (with --dataset).",
    ),
]


def _workload(workload, dataset, input_len, output_len, num_prompts, vocab_size):
    from tokenmill.bench.workloads import build_workload

    try:
        return build_workload(
            workload,
            None if dataset is None else str(dataset),
            num_prompts,
            input_len,
            output_len,
            vocab_size,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@bench_app.command("throughput")
def throughput(
    workload: WorkloadOpt = "nano",
    dataset: Annotated[Path | None, typer.Option(help="Any input `generate` accepts.")] = None,
    input_len: Annotated[
        int, typer.Option(help="Prompt tokens (random workload).")
    ] = DEFAULT_INPUT_LEN,
    output_len: Annotated[
        int, typer.Option(help="Output tokens (random / dataset).")
    ] = DEFAULT_OUTPUT_LEN,
    num_prompts: Annotated[
        int | None, typer.Option(help=f"Requests (default {DEFAULT_NUM_PROMPTS}).")
    ] = None,
    dummy_weights: Annotated[
        bool,
        typer.Option(
            "--dummy-weights",
            help="Random weights of --arch, made on the device: no checkpoint needed.",
        ),
    ] = False,
    arch: Annotated[
        str,
        typer.Option(
            help="Preset for --dummy-weights: qwen3-0.6b, "
            "llama-3.2-1b, llama-3.1-8b, qwen2.5-1.5b, smollm2-135m."
        ),
    ] = "qwen3-0.6b",
    peer: Annotated[
        str | None,
        typer.Option(help="Also run a peer in the same process: hf (transformers generate_batch)."),
    ] = None,
    output_json: Annotated[Path | None, typer.Option(help="Write the figures here.")] = None,
    model: o.Model = None,
    dtype: o.Dtype = o.ENGINE_DEFAULTS["dtype"],
    device: o.Device = o.ENGINE_DEFAULTS["device"],
    max_model_len: o.MaxModelLen = None,
    max_num_seqs: o.MaxNumSeqs = o.ENGINE_DEFAULTS["max_num_seqs"],
    max_num_batched_tokens: o.MaxNumBatchedTokens = o.ENGINE_DEFAULTS["max_num_batched_tokens"],
    kv_cache_memory: o.KvCacheMemory = None,
    gpu_memory_utilization: o.GpuMemoryUtilization = o.ENGINE_DEFAULTS["gpu_memory_utilization"],
    block_size: o.BlockSize = o.ENGINE_DEFAULTS["block_size"],
    enable_prefix_caching: o.EnablePrefixCaching = o.ENGINE_DEFAULTS["enable_prefix_caching"],
    enforce_eager: o.EnforceEager = o.ENGINE_DEFAULTS["enforce_eager"],
    seed: o.Seed = o.ENGINE_DEFAULTS["seed"],
    attention_backend: o.AttentionBackend = o.ENGINE_DEFAULTS["attention_backend"],
    threads: o.Threads = None,
) -> None:
    """Offline throughput of LLM.generate over a workload (warm-up excluded)."""
    from rich.console import Console

    from tokenmill.bench.presets import make_dummy_checkpoint
    from tokenmill.bench.throughput import card_name, run_hf_peer, run_tokenmill
    from tokenmill.cli import threads as cpu_threads
    from tokenmill.engine.llm import LLM

    console = Console()
    cpu_threads.configure(threads)
    if dummy_weights:
        if model is not None:
            raise typer.BadParameter("--dummy-weights and --model exclude each other")
        model = str(make_dummy_checkpoint(arch, dtype=dtype, device=device, seed=seed))
    config = o.engine_config_from(locals(), skip_tokenizer_init=dummy_weights)
    if workload == "nano" and dataset is None and num_prompts is None and _on_cpu(device):
        typer.echo(CPU_HINT, err=True)
    llm = LLM.from_config(config)
    vocab_size = min(10_000, llm.hf_config.vocab_size)
    wl = _workload(workload, dataset, input_len, output_len, num_prompts, vocab_size)
    info = llm.model_info()
    results = [run_tokenmill(llm, wl)]
    runner_dtype, runner_device, model_dir = llm.runner.dtype, llm.runner.device, llm.model_dir
    stats = llm.stats
    del llm
    if peer == "hf":
        import gc

        gc.collect()
        results.append(run_hf_peer(model_dir, wl, runner_dtype, runner_device))
    elif peer is not None:
        raise typer.BadParameter("--peer must be hf")
    report = {
        "card": card_name(),
        "workload": wl.name,
        "model": info,
        "engine": {
            "steps": stats.num_steps,
            "mean_batch_size": stats.mean_batch_size,
            "preemptions": stats.num_preemptions,
        },
        "results": [r.to_dict() for r in results],
    }
    _print_table(console, report, results)
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2))


CPU_HINT = (
    "note: the default nano workload (256 requests, about 277k tokens) takes hours on a CPU; "
    "for a figure in minutes: --workload random --num-prompts 16 --input-len 128 --output-len 32"
)


def _on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _print_table(console, report, results) -> None:
    from rich.table import Table

    t = Table(
        title=f"bench throughput: {report['workload']} on {report['card']} "
        f"({report['model']['architecture']}, {report['model']['dtype']})"
    )
    for col in (
        "engine",
        "requests",
        "wall s",
        "req/s",
        "input tok/s",
        "output tok/s",
        "total tok/s",
    ):
        t.add_column(col, justify="right" if col != "engine" else "left")
    for r in results:
        t.add_row(
            r.name,
            str(r.num_requests),
            f"{r.seconds:.2f}",
            f"{r.requests_per_s:.2f}",
            f"{r.input_tokens_per_s:,.0f}",
            f"{r.output_tokens_per_s:,.0f}",
            f"{r.total_tokens_per_s:,.0f}",
        )
    console.print(t)
    if len(results) == 2:
        console.print(
            f"tokenmill / peer output tok/s: "
            f"{results[0].output_tokens_per_s / results[1].output_tokens_per_s:.1f}x"
        )


def register(app: typer.Typer) -> None:
    try:
        from tokenmill.bench.serve import register_bench_serve
    except ModuleNotFoundError as e:  # bench serve is being written
        if e.name != "tokenmill.bench.serve":
            raise
    else:
        register_bench_serve(bench_app)
    app.add_typer(bench_app, name="bench")
