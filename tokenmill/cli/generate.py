"""`tokenmill generate INPUT`: run a model over every row of a dataset (see the README)."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

from tokenmill.cli import options as o
from tokenmill.io.job import DEFAULT_WINDOW_ROWS
from tokenmill.ray.job import DEFAULT_BATCH_SIZE as DEFAULT_RAY_BATCH_SIZE  # does not import ray

_J = "Job"
_R = "Ray (see README: Scaling out)"


def generate(
    input: Annotated[
        str,
        typer.Argument(
            help="JSONL/JSON Lines file, Parquet file or directory, "
            "saved or loadable Hugging Face dataset, hub dataset "
            "name, or - for stdin.",
            show_default=False,
            metavar="INPUT",
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Result file, .jsonl or .parquet (default: INPUT-stem.results"
            ".jsonl beside the input).",
            rich_help_panel=_J,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Dataset split for Hugging Face inputs (default: train).", rich_help_panel=_J
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N input rows.", rich_help_panel=_J)
    ] = None,
    id_column: Annotated[
        str | None,
        typer.Option(
            help="Column holding the row id (default: id when present, else the row number).",
            rich_help_panel=_J,
        ),
    ] = None,
    prompt_column: Annotated[
        str | None,
        typer.Option(
            help="Column holding the prompt (default: messages, prompt, text or input).",
            rich_help_panel=_J,
        ),
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Send each text prompt as one user message through the model's chat template "
            "(what instruct models expect); --no-chat sends the raw text. Default: --chat when "
            "the model has a chat template.",
            rich_help_panel=_J,
            show_default=False,
        ),
    ] = None,
    keep_columns: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-columns",
            "--keep-column",
            help="Input columns to copy into each result row (repeat, or comma-separate).",
            rich_help_panel=_J,
        ),
    ] = None,
    window_rows: Annotated[
        int,
        typer.Option(
            min=1,
            help="Rows read, tokenized and sorted at once; bounds memory.",
            rich_help_panel=_J,
        ),
    ] = DEFAULT_WINDOW_ROWS,
    sort: Annotated[
        bool,
        typer.Option(
            "--sort/--no-sort",
            help="Sort each window by length and shared prefix before queueing.",
            rich_help_panel=_J,
        ),
    ] = True,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Process shard I/N (rows i with i % N == I) (default: from SLURM_ARRAY_TASK_ID / "
            "SLURM_ARRAY_TASK_COUNT, else 0/1).",
            rich_help_panel=_J,
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing output instead of resuming into it.",
            rich_help_panel=_J,
        ),
    ] = False,
    fail_fast: Annotated[
        bool,
        typer.Option(
            "--fail-fast",
            help="Stop at the first bad row (exit code 4) instead of writing an error row.",
            rich_help_panel=_J,
        ),
    ] = False,
    progress_interval: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds between progress lines when stdout is not a terminal.",
            rich_help_panel=_J,
        ),
    ] = 30.0,
    commit_seconds: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds between durable commits (fsync + resume journal).",
            rich_help_panel=_J,
        ),
    ] = 5.0,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress and no summary table (the report file is still written).",
            rich_help_panel=_J,
        ),
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run on a Ray cluster (pip install 'tokenmill[ray]'); OUTPUT becomes a directory "
            "of part files, joined by tokenmill merge. JSONL / Parquet inputs only, no resume.",
            rich_help_panel=_R,
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join: HOST:6379, or auto for one started on this machine with "
            "ray start; implies --ray (default: $RAY_ADDRESS, else a new local instance).",
            rich_help_panel=_R,
            show_default=False,
        ),
    ] = None,
    ray_workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Engine workers (Ray actors) (default: one per GPU in the cluster, 1 without).",
            rich_help_panel=_R,
            show_default=False,
        ),
    ] = None,
    ray_batch_size: Annotated[
        int,
        typer.Option(min=1, help="Rows per Ray batch sent to a worker.", rich_help_panel=_R),
    ] = DEFAULT_RAY_BATCH_SIZE,
    # Engine
    model: o.Model = o.ENGINE_DEFAULTS["model"],
    revision: o.Revision = o.ENGINE_DEFAULTS["revision"],
    download_dir: o.DownloadDir = o.ENGINE_DEFAULTS["download_dir"],
    dtype: o.Dtype = o.ENGINE_DEFAULTS["dtype"],
    device: o.Device = o.ENGINE_DEFAULTS["device"],
    max_model_len: o.MaxModelLen = o.ENGINE_DEFAULTS["max_model_len"],
    max_num_seqs: o.MaxNumSeqs = o.ENGINE_DEFAULTS["max_num_seqs"],
    max_num_batched_tokens: o.MaxNumBatchedTokens = o.ENGINE_DEFAULTS["max_num_batched_tokens"],
    kv_cache_memory: o.KvCacheMemory = o.ENGINE_DEFAULTS["kv_cache_memory"],
    gpu_memory_utilization: o.GpuMemoryUtilization = o.ENGINE_DEFAULTS["gpu_memory_utilization"],
    block_size: o.BlockSize = o.ENGINE_DEFAULTS["block_size"],
    enable_prefix_caching: o.EnablePrefixCaching = o.ENGINE_DEFAULTS["enable_prefix_caching"],
    enforce_eager: o.EnforceEager = o.ENGINE_DEFAULTS["enforce_eager"],
    seed: o.Seed = o.ENGINE_DEFAULTS["seed"],
    attention_backend: o.AttentionBackend = o.ENGINE_DEFAULTS["attention_backend"],
    tensor_parallel_size: o.TensorParallelSize = o.ENGINE_DEFAULTS["tensor_parallel_size"],
    threads: o.Threads = None,
    # Sampling
    n: o.N = o.SAMPLING_DEFAULTS["n"],
    temperature: o.Temperature = o.SAMPLING_DEFAULTS["temperature"],
    top_p: o.TopP = o.SAMPLING_DEFAULTS["top_p"],
    top_k: o.TopK = o.SAMPLING_DEFAULTS["top_k"],
    min_p: o.MinP = o.SAMPLING_DEFAULTS["min_p"],
    presence_penalty: o.PresencePenalty = o.SAMPLING_DEFAULTS["presence_penalty"],
    frequency_penalty: o.FrequencyPenalty = o.SAMPLING_DEFAULTS["frequency_penalty"],
    repetition_penalty: o.RepetitionPenalty = o.SAMPLING_DEFAULTS["repetition_penalty"],
    sampling_seed: o.SamplingSeed = None,
    stop: o.Stop = o.SAMPLING_DEFAULTS["stop"],
    stop_token_ids: o.StopTokenIds = o.SAMPLING_DEFAULTS["stop_token_ids"],
    include_stop_str_in_output: o.IncludeStopStrInOutput = o.SAMPLING_DEFAULTS[
        "include_stop_str_in_output"
    ],
    ignore_eos: o.IgnoreEos = o.SAMPLING_DEFAULTS["ignore_eos"],
    max_tokens: o.MaxTokens = o.SAMPLING_DEFAULTS["max_tokens"],
    min_tokens: o.MinTokens = o.SAMPLING_DEFAULTS["min_tokens"],
    logprobs: o.Logprobs = o.SAMPLING_DEFAULTS["logprobs"],
    skip_special_tokens: o.SkipSpecialTokens = o.SAMPLING_DEFAULTS["skip_special_tokens"],
    json_schema: o.JsonSchema = None,
    regex: o.Regex = None,
    choice: o.Choice = None,
) -> None:
    """Generate completions for every row of INPUT into OUTPUT, resumably, in input order.

    Exit codes: 0 all rows ok, 1 finished with error rows, 2 bad command line, 3 could not run,
    4 stopped by --fail-fast, 6 another run holds the output, 130 interrupted (rerun the same
    command to resume).
    """
    from tokenmill.cli import threads as cpu_threads
    from tokenmill.io.job import JobConfig, run_job
    from tokenmill.io.shard import parse_shard

    values = locals()
    # An engine option added to options.py but not yet here keeps its default.
    engine = o.engine_config_from(values)
    sampling = o.sampling_params(
        sampling_seed=sampling_seed,
        structured_outputs=o.structured_outputs(json_schema, regex, choice),
        **{k: values[k] for k in o.SAMPLING_DEFAULTS},
    )
    try:
        shard_value = parse_shard(shard)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shard") from e
    keep = tuple(c.strip() for item in keep_columns or () for c in item.split(",") if c.strip())
    config = JobConfig(
        input=input,
        output=output,
        engine=engine,
        sampling=sampling,
        split=split,
        limit=limit,
        id_column=id_column,
        prompt_column=prompt_column,
        as_chat=chat,
        keep_columns=keep,
        window_rows=window_rows,
        sort=sort,
        shard=shard_value,
        overwrite=overwrite,
        fail_fast=fail_fast,
        progress_interval_s=progress_interval,
        commit_s=commit_seconds,
        quiet=quiet,
        command_line=shlex.join(["tokenmill", *sys.argv[1:]]),
    )
    cpu_threads.configure(threads)
    if ray or ray_address:
        from tokenmill.ray.job import RayOptions, run_ray_job

        options = RayOptions(ray_address, ray_workers, ray_batch_size)
        raise typer.Exit(run_ray_job(config, options))
    raise typer.Exit(run_job(config))


def register(app: typer.Typer) -> None:
    app.command("generate", no_args_is_help=True)(generate)
