"""`tokenmill bench throughput` (offline speed) and `tokenmill bench serve` (a live server)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from tokenmill.bench.presets import PRESETS
from tokenmill.bench.workloads import DEFAULT_INPUT_LEN, DEFAULT_NUM_PROMPTS, DEFAULT_OUTPUT_LEN
from tokenmill.cli import options as o

bench_app = typer.Typer(help="Measure throughput and latency.", no_args_is_help=True)

WorkloadOpt = Annotated[
    str,
    typer.Option(
        "--workload",
        help="nano (nano-vllm's bench.py draw: 256 requests, about 143k prompt and 134k output "
        "tokens; hours on a CPU), mixed (2,000 log-normal requests, like a batch job), random, "
        "or dataset (with --dataset).",
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
@o.with_engine_options()
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
        int | None, typer.Option(help=f"Requests (default {DEFAULT_NUM_PROMPTS}; mixed: 2,000).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (default: the workload's, 0.6).")
    ] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (-1: off).")] = -1,
    bandwidth: Annotated[
        float | None,
        typer.Option(help="Copy bandwidth in TB/s for the floor (default: measured here)."),
    ] = None,
    tflops: Annotated[
        float | None,
        typer.Option(help="Matmul rate in TFLOP/s for the floor (default: measured here)."),
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
        typer.Option(help=f"Preset for --dummy-weights: {', '.join(PRESETS)}."),
    ] = "qwen3-0.6b",
    peer: Annotated[
        str | None,
        typer.Option(help="Also run a peer in the same process: hf (transformers generate_batch)."),
    ] = None,
    output_json: Annotated[Path | None, typer.Option(help="Write the figures here.")] = None,
    engine_options: o.EngineOptions = None,
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
    e = engine_options
    if dummy_weights:
        if e["model"] is not None:
            raise typer.BadParameter("--dummy-weights and --model exclude each other")
        # Only the transformers peer reads weights from disk; the engine makes its own.
        e["model"] = str(
            make_dummy_checkpoint(
                arch, dtype=e["dtype"], device=e["device"], seed=e["seed"], weights=peer == "hf"
            )
        )
    load_format = "dummy" if dummy_weights and peer != "hf" else "auto"
    config = o.engine_config(**e, skip_tokenizer_init=dummy_weights, load_format=load_format)
    if workload == "nano" and dataset is None and num_prompts is None and _on_cpu(e["device"]):
        typer.echo(CPU_HINT, err=True)
    t_start = time.perf_counter()
    llm = LLM.from_config(config)  # load, graph capture and kernel warm-up: not timed below
    startup_seconds = time.perf_counter() - t_start
    vocab_size = min(10_000, llm.model_info()["vocab_size"])
    wl = _workload(workload, dataset, input_len, output_len, num_prompts, vocab_size)
    wl.top_p, wl.top_k = top_p, top_k
    if temperature is not None:
        wl.temperature = temperature
    info = llm.model_info()
    results = [run_tokenmill(llm, wl)]
    runner_dtype, runner_device, model_dir = llm.runner.dtype, llm.runner.device, llm.model_dir
    stats, hf_config = llm.stats, llm.hf_config
    del llm
    floor = _floor(wl, hf_config, runner_dtype, runner_device, bandwidth, tflops)
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
        "sampling": {"temperature": wl.temperature, "top_p": wl.top_p, "top_k": wl.top_k},
        "engine": {
            "startup_seconds": startup_seconds,
            "steps": stats.num_steps,
            "mean_batch_size": stats.mean_batch_size,
            "preemptions": stats.num_preemptions,
            "graph_steps": getattr(stats, "graph_steps", None),
            "eager_steps": getattr(stats, "eager_steps", None),
            "kernel_compiles": getattr(stats, "kernel_compiles", None),
        },
        "floor": None if floor is None else floor.to_dict(),
        "results": [
            {
                **r.to_dict(),
                "fraction_of_floor": None if floor is None else floor.fraction(r.seconds),
            }
            for r in results
        ],
    }
    _print_table(console, report, results, floor)
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2))


def _floor(wl, hf_config, dtype, device, bandwidth_tbps, tflops):
    """The workload's roofline floor on this card (None for text prompts: lengths unknown)."""
    from tokenmill.bench.roofline import (
        ModelShape,
        measure_copy_bandwidth,
        measure_matmul_rate,
        roofline_floor,
    )

    prompt_lens = wl.prompt_lens
    if prompt_lens is None:
        return None
    bw = bandwidth_tbps * 1e12 if bandwidth_tbps else measure_copy_bandwidth(device)
    rate = tflops * 1e12 if tflops else measure_matmul_rate(device, dtype)
    shape = ModelShape.from_hf_config(hf_config, dtype_bytes=dtype.itemsize)
    return roofline_floor(shape, prompt_lens, [r.max_tokens for r in wl.requests], bw, rate)


CPU_HINT = (
    "note: the default nano workload (256 requests, about 277k tokens) takes hours on a CPU; "
    "for a figure in minutes: --workload random --num-prompts 16 --input-len 128 --output-len 32"
)


def _on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _print_table(console, report, results, floor=None) -> None:
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
        "fraction of floor",
    ):
        if col == "engine":
            t.add_column(col, justify="left", min_width=9)  # "tokenmill" stays whole
        else:
            t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            r.name,
            str(r.num_requests),
            f"{r.seconds:.2f}",
            f"{r.requests_per_s:.2f}",
            f"{r.input_tokens_per_s:,.0f}",
            f"{r.output_tokens_per_s:,.0f}",
            f"{r.total_tokens_per_s:,.0f}",
            "-" if floor is None else f"{floor.fraction(r.seconds):.2f}",
        )
    console.print(t)
    if floor is not None:
        console.print(
            f"floor {floor.seconds:.2f} s ({floor.bound}-bound: {floor.bytes / 1e12:.2f} TB at "
            f"{floor.bandwidth / 1e12:.2f} TB/s, {floor.flops / 1e12:,.3g} TFLOP at "
            f"{floor.flops_per_s / 1e12:,.3g} TFLOP/s; {floor.decode_steps} decode steps)"
        )
        fractions = ", ".join(f"{r.name} {floor.fraction(r.seconds):.2f}" for r in results)
        console.print(f"fraction of floor: {fractions}")
    for r in results:
        if r.kernel_compiles:
            names = ", ".join(sorted(set(r.kernel_compiles)))
            console.print(
                f"[yellow]warning: {len(r.kernel_compiles)} Triton kernel compiles inside "
                f"{r.name}'s timed pass ({names}); its figure includes compile time[/yellow]"
            )
    eng = report["engine"]
    console.print(
        f"engine steps {eng['steps']} (graph {eng['graph_steps']}, eager {eng['eager_steps']}), "
        f"mean batch {eng['mean_batch_size']:.1f}, preemptions {eng['preemptions']}; "
        f"start-up {eng['startup_seconds']:.1f} s (load, graphs, kernel warm-up)"
    )
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
