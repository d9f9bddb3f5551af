"""The Ray Data processor: one tokenmill engine per actor, fed by `Dataset.map_batches`.

    ds ──map_batches(TokenmillProcessor, concurrency=N, num_gpus=G, batch_size=B)──> results

Each actor loads one engine (`LLM.from_config`) once and turns every batch of input rows into
result rows with the batch job's own stages: io/parse.py's RowParser reads the row schema of
`tokenmill generate` (prompt / messages / OpenAI batch lines, `sampling` overrides), the Batcher
queues the batch as one continuous batch, and io/format.py formats each result. A result row is
therefore the row `generate` writes for the same input row, provided the input rows carry their
global position (INDEX_COLUMN / LINE_COLUMN, as `read_input` numbers them).

Input columns the processor understands:
    JSON_COLUMN      a raw JSON line (parsed like a JSONL input line; bad JSON -> an error row)
    INDEX_COLUMN     the row's 0-based index in the whole input (default: its place in the batch)
    LINE_COLUMN      its 1-based line number in a JSONL input
    anything else    the row's own columns (prompt, messages, sampling, id, kept columns ...)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io.batcher import Batcher
from tokenmill.io.format import format_result
from tokenmill.io.parse import RowParser, resolve_as_chat
from tokenmill.io.readers import parse_json_line
from tokenmill.io.rows import RawRecord
from tokenmill.io.writers import flat_row, json_line

INDEX_COLUMN = "__tokenmill_index"
LINE_COLUMN = "__tokenmill_line"
JSON_COLUMN = "__tokenmill_json"
RESERVED_COLUMNS = (INDEX_COLUMN, LINE_COLUMN, JSON_COLUMN)

# Output layouts: "columns" = the columns of `generate`'s Parquet output (nested values as JSON
# text, so every batch has the same flat schema); "json" = one binary column JSON_LINE_COLUMN
# holding the exact JSON line `generate` writes to a .jsonl output, and `error` (see
# dataset.ResultsDatasink).
OUTPUT_COLUMNS = "columns"
OUTPUT_JSON = "json"
JSON_LINE_COLUMN = "json_line"
# Result columns with a fixed type; any other column that is null in a whole batch is a string.
_INT_COLUMNS = ("index", "line", "prompt_tokens", "output_tokens")


@dataclass
class ProcessorConfig:
    """What `build_processor` needs: the engine, the job's row options and the Ray resources."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_column: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    as_chat: bool | None = None  # text prompts through the chat template; None: if it has one
    sort: bool = True  # order each batch by length / shared prefix before queueing it
    output: str = OUTPUT_COLUMNS  # OUTPUT_COLUMNS or OUTPUT_JSON
    concurrency: int = 1  # engine actors (one engine each)
    num_gpus: float = 0  # GPUs per actor: 1 on a GPU cluster, 0 on CPU
    num_cpus: float = 1  # CPUs per actor
    # Rows per map_batches call, queued to the engine as one continuous batch. NOTE: an actor
    # drains each batch before it takes the next, so the engine runs short of requests at every
    # batch's tail; bigger batches make that a smaller share of the time.
    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.output not in (OUTPUT_COLUMNS, OUTPUT_JSON):
            raise ValueError(f"output must be {OUTPUT_COLUMNS!r} or {OUTPUT_JSON!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (got {self.concurrency})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")


class TokenmillProcessor:
    """A `map_batches` callable class: holds one engine, maps input rows to result rows.

    Ray builds one instance per actor with `fn_constructor_args=(config,)`; `__call__` takes and
    returns pyarrow Tables (`batch_format="pyarrow"`), result rows in the batch's row order.
    """

    def __init__(self, config: ProcessorConfig):
        from tokenmill import LLM

        self.config = config
        self.llm = LLM.from_config(config.engine)
        self.parser = RowParser(
            config.sampling,
            config.prompt_column,
            config.id_column,
            config.keep_columns,
            as_chat=resolve_as_chat(config.as_chat, self.llm),
        )
        self.model = self.llm.model_info().get("model", str(config.engine.model))

    def __call__(self, batch):
        records = batch_records(batch.to_pylist())
        if not records:
            return _to_table([], self.config.output)
        batcher = Batcher(self.llm, self.parser, window_rows=len(records), sort=self.config.sort)
        positioned: Iterator[tuple[int, RawRecord]] = iter(enumerate(records))
        results = [format_result(r, self.model) for r in batcher.run(positioned, 0)]
        if len(results) != len(records):  # pragma: no cover - a Batcher bug
            raise RuntimeError(f"{len(records)} rows in, {len(results)} results out")
        return _to_table(results, self.config.output)


def build_processor(config: ProcessorConfig):
    """Returns `ds -> ds` running `config`'s engine over every row (as vLLM's build_processor)."""

    def process(ds):
        from ray.data import ActorPoolStrategy

        return ds.map_batches(
            TokenmillProcessor,
            fn_constructor_args=(config,),
            batch_format="pyarrow",
            batch_size=config.batch_size,
            compute=ActorPoolStrategy(size=config.concurrency),
            num_gpus=config.num_gpus,
            num_cpus=config.num_cpus,
            zero_copy_batch=True,
        )

    return process


def batch_records(rows: list[dict[str, Any]]) -> list[RawRecord]:
    """Input rows (dicts) -> RawRecords with the row's global index and line where given."""
    records = []
    for position, data in enumerate(rows):
        index = data.pop(INDEX_COLUMN, None)
        index = position if index is None else int(index)
        line = data.pop(LINE_COLUMN, None)
        raw = data.pop(JSON_COLUMN, None)
        if raw is not None:
            records.append(parse_json_line(raw, index, line))
        else:
            records.append(RawRecord(index, line, data=data))
    return records


def _to_table(rows: list[dict[str, Any]], output: str):
    import pyarrow as pa

    if output == OUTPUT_JSON:
        errors = [None if r.get("error") is None else _json(r["error"]) for r in rows]
        return pa.table(
            {
                JSON_LINE_COLUMN: pa.array([json_line(r) for r in rows], pa.binary()),
                "error": pa.array(errors, pa.string()),
            }
        )
    table = pa.Table.from_pylist([flat_row(r) for r in rows])  # the Parquet writer's layout
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):  # a column null in this whole batch, typed for every batch
            want = pa.int64() if f.name in _INT_COLUMNS else pa.string()
            table = table.set_column(i, f.name, table.column(i).cast(want))
    return table


def _json(value: Any) -> str:
    return json_line(value).decode("utf-8").rstrip("\n")
