"""`tokenmill generate --ray`: the batch job on a Ray cluster, JobConfig in, exit code out.

    read_input (Ray readers) ──> build_processor (engine actors) ──> write_output (Ray sinks)

What differs from the single-process job (io/job.py): OUTPUT is a directory of part files (join
them with `tokenmill merge OUTPUT/* -o FILE`); there is no resume journal (a rerun starts over:
pass --overwrite), Ray retries failed tasks and actors itself; --shard and --fail-fast do not
apply. Rows, ids, texts and every result column are the single-process job's.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.io import exit_codes
from tokenmill.io.job import CannotRun, JobConfig, default_output
from tokenmill.ray.processor import (
    OUTPUT_COLUMNS,
    OUTPUT_JSON,
    ProcessorConfig,
    build_processor,
)

DEFAULT_BATCH_SIZE = ProcessorConfig.batch_size


@dataclass
class RayOptions:
    """How the job uses the cluster (the CLI's --ray-* options)."""

    address: str | None = None  # None: $RAY_ADDRESS, else a new Ray instance on this machine
    workers: int | None = None  # engine actors; None: one per GPU in the cluster, 1 without GPUs
    batch_size: int = DEFAULT_BATCH_SIZE  # rows per map_batches call


def run_ray_job(config: JobConfig, options: RayOptions) -> int:
    """Run the job through Ray; returns an exit code from tokenmill.io.exit_codes."""
    try:
        from tokenmill.ray.dataset import RayInputError
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    try:
        return _run(config, options)
    except (CannotRun, RayInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CANNOT_RUN


def _run(config: JobConfig, options: RayOptions) -> int:
    import ray
    from ray.data import DataContext

    from tokenmill.ray.dataset import RayInputError, output_kind, read_input, write_output

    _check_supported(config)
    output = config.output or str(default_output(config.input, config.shard))
    output_kind(output)  # a bad extension fails before Ray starts
    _prepare_output(output, config.overwrite)
    started_here = not ray.is_initialized()
    if started_here:
        address = _address(options)
        try:
            ray.init(address=address, log_to_driver=not config.quiet)
        except Exception as e:  # noqa: BLE001 - Ray raises several types for an unreachable head
            where = "a local Ray instance" if address == "local" else f"Ray at {address}"
            raise CannotRun(f"could not start or join {where}: {e}; check --ray-address") from e
    if config.quiet:  # Ray Data logs every dataset it runs at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        DataContext.get_current().enable_progress_bars = not config.quiet
        processor = _processor_config(config, options, output)
        t0 = time.monotonic()
        try:
            ds = read_input(config.input, limit=config.limit)
            sink = write_output(build_processor(processor)(ds), output)
        except RayInputError:
            raise
        except Exception as e:  # noqa: BLE001 - a task, actor or engine failure on the cluster
            raise CannotRun(
                f"the Ray job failed ({type(e).__name__}: {e}); fix the cause and rerun with "
                "--overwrite"
            ) from e
    finally:
        if started_here:
            ray.shutdown()
    if not config.quiet:
        print(
            f"wrote {sink.num_rows} rows ({sink.num_errors} error rows) to {output}/ in "
            f"{time.monotonic() - t0:.1f}s with {processor.concurrency} engine worker(s); "
            f"join the parts with: tokenmill merge {output}/* -o FILE",
            file=sys.stderr,
        )
    return exit_codes.ROW_ERRORS if sink.num_errors else exit_codes.OK


def _address(options: RayOptions) -> str:
    """The cluster to join; "local" starts a new instance.

    NOTE: ray.init() without an address would also join whatever `ray start` last recorded on
    this machine, even a cluster that has gone since; `--ray-address auto` asks for that.
    """
    return options.address or os.environ.get("RAY_ADDRESS") or "local"


def _check_supported(config: JobConfig) -> None:
    if not config.shard.is_whole:
        raise CannotRun(
            f"--ray runs the whole input on the cluster; drop --shard {config.shard} "
            "(and unset SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)"
        )
    if config.fail_fast:
        raise CannotRun("--fail-fast is not supported with --ray; drop one of them")


def _prepare_output(output: str, overwrite: bool) -> None:
    if "://" in output:  # an object store: Ray's sink appends new part files
        return
    path = Path(output)
    if path.exists() and not overwrite:
        raise CannotRun(
            f"{output} exists and --ray does not resume into it; pass --overwrite to replace it "
            "or choose another --output"
        )
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _processor_config(config: JobConfig, options: RayOptions, output: str) -> ProcessorConfig:
    import ray

    from tokenmill.ray.dataset import output_kind

    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = 1 if cluster_gpus and config.engine.device != "cpu" else 0
    workers = options.workers or max(1, cluster_gpus if num_gpus else 1)
    return ProcessorConfig(
        engine=config.engine,
        sampling=config.sampling,
        prompt_column=config.prompt_column,
        id_column=config.id_column,
        keep_columns=config.keep_columns,
        as_chat=config.as_chat,
        sort=config.sort,
        output=OUTPUT_JSON if output_kind(output) == "jsonl" else OUTPUT_COLUMNS,
        concurrency=workers,
        num_gpus=num_gpus,
        batch_size=options.batch_size,
    )
