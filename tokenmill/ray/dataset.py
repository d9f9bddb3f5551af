"""Reading a job's input into a Ray Dataset and writing its results, with Ray's readers and sinks.

    read_input("prompts.jsonl")    read_text: one row per non-blank line, JSON_COLUMN + INDEX_COLUMN
                                   + LINE_COLUMN
    read_input("data/")            read_parquet (files in sorted order): the columns + INDEX_COLUMN
    write_output(ds, "out.jsonl")  a directory of part files, each holding rows in input order

Rows are numbered as `tokenmill generate` numbers them (index = position among non-blank lines,
line = 1-based line number), so result ids, `index` and `line` match the single-process job.

NOTE: numbering needs every block's row count, so the input (the prompts, not the results) is
read once into Ray's object store (spilled to disk when large) before inference starts; the
results stream straight to the sink.
"""

from __future__ import annotations

from pathlib import Path

try:
    from ray.data.block import BlockAccessor
    from ray.data.datasource import BlockBasedFileDatasink
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("tokenmill's Ray support needs Ray Data: pip install 'tokenmill[ray]'") from e

from tokenmill.ray.processor import (
    INDEX_COLUMN,
    JSON_COLUMN,
    JSON_LINE_COLUMN,
    LINE_COLUMN,
)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class RayInputError(ValueError):
    """An input `--ray` cannot read; the message says what to do instead."""


def read_input(spec: str, limit: int | None = None):
    """The rows of INPUT (a JSONL file, a Parquet file or a directory of Parquet files)."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        ds = ray.data.read_text(str(path), drop_empty_lines=False)
        is_text = True
    elif path.is_file() and path.suffix.lower() == ".parquet":
        ds, is_text = ray.data.read_parquet(str(path)), False
    elif path.is_dir() and any(path.rglob("*.parquet")):
        files = sorted(str(p) for p in path.rglob("*.parquet"))  # the single-process order
        ds, is_text = ray.data.read_parquet(files), False
    else:
        raise RayInputError(
            f"--ray reads a .jsonl file, a .parquet file or a directory of .parquet files "
            f"(got {spec}); convert the input to one of these, or run without --ray"
        )
    return _number_rows(ds, is_text, limit)


def _number_rows(ds, is_text: bool, limit: int | None):
    """Adds INDEX_COLUMN (and LINE_COLUMN for text) numbered across the whole dataset, in order."""
    import ray

    refs = ds.to_arrow_refs()  # materializes the input, blocks in dataset order
    count = ray.remote(_count_rows)
    number = ray.remote(_number_block)
    num_rows = ray.get([count.remote(ref, is_text) for ref in refs])
    numbered, line_offset, index_offset = [], 0, 0
    for ref, (num_lines, num_kept) in zip(refs, num_rows, strict=True):
        numbered.append(number.remote(ref, is_text, line_offset, index_offset, limit))
        line_offset += num_lines
        index_offset += num_kept
    return ray.data.from_arrow_refs(numbered)


def _count_rows(table, is_text: bool) -> tuple[int, int]:
    """(rows in the block, rows that become input rows: non-blank lines for text)."""
    if not is_text:
        return table.num_rows, table.num_rows
    lines = table.column("text").to_pylist()
    return len(lines), sum(1 for line in lines if line.strip())


def _number_block(table, is_text: bool, line_offset: int, index_offset: int, limit: int | None):
    import pyarrow as pa

    if is_text:
        lines = table.column("text").to_pylist()
        kept = [(i, line) for i, line in enumerate(lines) if line.strip()]
        out = pa.table(
            {
                JSON_COLUMN: pa.array([line for _, line in kept], pa.string()),
                INDEX_COLUMN: pa.array(range(index_offset, index_offset + len(kept)), pa.int64()),
                LINE_COLUMN: pa.array([line_offset + i + 1 for i, _ in kept], pa.int64()),
            }
        )
    else:
        index = pa.array(range(index_offset, index_offset + table.num_rows), pa.int64())
        out = table.append_column(INDEX_COLUMN, index)
    if limit is not None:
        out = out.slice(0, max(0, min(out.num_rows, limit - index_offset)))
    return out


def write_output(ds, output: str) -> ResultsDatasink:
    """Write result rows to OUTPUT, a directory of part files (.jsonl or .parquet by its name).

    Each part holds a run of rows in input order (names sort in input order too); `tokenmill
    merge OUTPUT/* -o FILE` joins them into one file, checking every row is there once. Returns
    the sink, which has counted the rows and error rows written.
    """
    sink = ResultsDatasink(output, output_kind(output))
    ds.write_datasink(sink)
    return sink


def output_kind(output: str) -> str:
    suffix = Path(output.rstrip("/")).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise RayInputError(f"output {output} must end in .jsonl or .parquet")


class ResultsDatasink(BlockBasedFileDatasink):
    """Ray's file sink for the processor's result rows, one file per write task.

    jsonl: the processor's JSON_LINE_COLUMN verbatim, i.e. the bytes `generate` writes (Ray's
    write_json goes through pandas, which rounds floats); parquet: the processor's columns, the
    layout of `generate`'s Parquet output. Both layouts have an `error` column (null when ok),
    which is how rows and error rows are counted for the job's summary.
    """

    def __init__(self, path: str, kind: str):
        super().__init__(path, file_format=kind)
        self.kind = kind
        self.num_rows = 0
        self.num_errors = 0

    def write(self, blocks, ctx) -> tuple[int, int]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        super().write(tables, ctx)
        num_rows = sum(t.num_rows for t in tables)
        return num_rows, num_rows - sum(t.column("error").null_count for t in tables)

    def write_block_to_file(self, block, file) -> None:
        table = block.to_arrow()
        if self.kind == "jsonl":
            for chunk in table.column(JSON_LINE_COLUMN).chunks:
                file.write(b"".join(chunk.to_pylist()))
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, file)

    def on_write_complete(self, write_result) -> None:
        super().on_write_complete(write_result)
        counts = [r for r in write_result.write_returns if r is not None]
        self.num_rows = sum(rows for rows, _ in counts)
        self.num_errors = sum(errors for _, errors in counts)
