"""Which launch configuration of the split-K paged decode kernel reads the KV cache fastest on
realistic, mixed-length decode batches: one better default, not per-shape tuning. One GPU
call, under 150 s on an H200 with every compile included:

    python3 benchmarks/decode_sweep.py              # log + JSON to $OUT (or out/decode_sweep)
    python3 benchmarks/decode_sweep.py --smoke      # tiny shapes; on CPU via TRITON_INTERPRET

Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128), bf16, block_size 16,
one layer; every batch's blocks scattered at random through one shared cache. Batches (one
query token per sequence; context = keys read, the new token's included; seed 0):

  w1_256       256 seqs, context uniform 100..2,048       (W1 mid-run)
  w1_128       128 seqs, context uniform 600..2,048       (W1 late)
  w2_1000      1,000 seqs, log-normal median 600, 16..6,000 (W2's decode rows)
  tail_32      32 seqs, context uniform 500..3,000        (the run's tail)
  uniform_256  256 seqs all 1,024                          (the "kernel alone" case)

Configs, in three stages (every compile counts against the budget, so no full product):

  1  split settings at the default tiles: the default (num_splits from default_num_splits per
     batch: "auto"), 1 split, and {2, 4, 8} splits x min_partition {128, 256, 512}, each with
     the grid as today and with the KV head on its fastest axis.
  2  tiles at stage 1's best split setting: block_n {64, 128, 32} x num_warps {4, 8} x
     num_stages {2, 3, 4}, less 8 warps on 32-key tiles; with k_rows, block_n {64, 128} x
     num_warps {4, 8} x num_stages {2, 3} and 32 x 4 x 3 (24 tiles, a compile each). It
     stops early enough to leave stage 3 --reserve-s.
  3  stage 2's best 3 tiles at stage 1's best 3 split settings and at 1 split.

Names: "<splits>[H] n<block_n>w<num_warps>s<num_stages>[K]", splits "auto", "1" or
"<num_splits>x<min_partition>"; H = heads_first (the KV head on the grid's fastest axis); K =
k_rows (K tiles loaded [block_n, head_dim]).

Every config is first checked on every batch against the torch reference (max |out - ref| <=
--tol; the output buffer is NaN-filled first, so a launch that writes nothing fails too): a
wrong cell is WRONG and not timed; one that does not compile or launch (e.g. out of shared
memory) is n/a. Then the median of --iters runs after 3 warm-ups, CUDA events around the whole
launcher call (decode kernel + reduce). Before each timed run the L2 is flushed by reading
256 MB (as when every layer reads its own cache) and the GPU is held busy a moment, so the
events time the kernels, not the host launching them. KV read = sum over sequences of
context * num_kv_heads * head_dim * 2 (K and V) * 2 bytes.

New configs stop starting after --budget-s; what was measured is still tabulated: TB/s per
config and batch, the geometric mean across batches, and the best config's ratio to the
default. The JSON ($OUT/decode_sweep.json) is rewritten after every config, so a killed run
leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version

import torch

# bench_attention, first: it switches Triton to its interpreter on CPU (before anything loads
# triton) and puts the repository on sys.path
from bench_attention import DEV, DTYPE, ON_GPU, lognormal_contexts, output

from tokenmill.engine.attention import AttentionMetadata
from tokenmill.kernels import paged_attention as pa
from tokenmill.kernels.attention_torch import paged_attention_torch

BLOCK_SIZE = 16
L2_FLUSH_BYTES = 256 << 20  # > the H200's 50 MB L2
BUSY_CYCLES = 300_000  # ~0.15 ms at ~2 GHz: longer than the launcher's host time
WARMUP = 3


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


QWEN3_0_6B = Shape(16, 8, 128)
SMOKE_SHAPE = Shape(4, 2, 32)


# ---- batches ------------------------------------------------------------------------------------
def batch_contexts(smoke: bool) -> dict[str, list[int]]:
    """name -> each sequence's context length (keys read, the new token's included)."""
    gen = torch.Generator().manual_seed(0)

    def uniform(n: int, lo: int, hi: int) -> list[int]:
        return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()

    if smoke:
        return {
            "w1_256": uniform(6, 10, 120),
            "w1_128": uniform(4, 40, 120),
            "w2_1000": lognormal_contexts(8, 40, gen, 1, 200),
            "tail_32": uniform(2, 50, 200),
            "uniform_256": [64] * 4,
        }
    return {
        "w1_256": uniform(256, 100, 2048),
        "w1_128": uniform(128, 600, 2048),
        "w2_1000": lognormal_contexts(1000, 600, gen, 16, 6000),
        "tail_32": uniform(32, 500, 3000),
        "uniform_256": [1024] * 256,
    }


@dataclass
class Batch:
    name: str
    seq_lens_cpu: list[int]
    q: torch.Tensor  # [num_seqs, num_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    out: torch.Tensor  # [num_seqs, num_heads, head_dim], reused by every config
    ref: torch.Tensor  # [num_seqs, num_heads, head_dim], the torch reference's output
    kv_bytes: int
    default_num_splits: int  # what the launcher picks for this batch size

    def summary(self) -> dict:
        n = sorted(self.seq_lens_cpu)
        return dict(
            name=self.name,
            num_seqs=len(n),
            keys=sum(n),
            kv_bytes=self.kv_bytes,
            context_min=n[0],
            context_median=n[len(n) // 2],
            context_max=n[-1],
            default_num_splits=self.default_num_splits,
        )


def build_batches(contexts: dict[str, list[int]], shape: Shape, seed: int = 0):
    """-> (k_cache, v_cache, [Batch]): one cache pool a quarter larger than the largest batch
    needs; each batch's blocks a random draw from all of it, so no two neighbours in a block
    table are neighbours in memory (as after a long run of the engine)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_batch = {name: [-(-n // BLOCK_SIZE) for n in ctx] for name, ctx in contexts.items()}
    num_blocks = math.ceil(1.25 * max(sum(b) for b in blocks_per_batch.values()))
    # [num_blocks, block_size, num_kv_heads, head_dim]
    cache_shape = (num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
    dgen = torch.Generator(device=DEV).manual_seed(seed)
    k_cache = torch.randn(cache_shape, generator=dgen, device=DEV, dtype=DTYPE)
    v_cache = torch.randn(cache_shape, generator=dgen, device=DEV, dtype=DTYPE)
    scale = shape.head_dim**-0.5
    batches = []
    for name, ctx in contexts.items():
        blocks = blocks_per_batch[name]
        perm = torch.randperm(num_blocks, generator=gen)[: sum(blocks)].int()
        table = torch.zeros(len(ctx), max(blocks), dtype=torch.int32)
        at = 0
        for s, n in enumerate(blocks):
            table[s, :n] = perm[at : at + n]
            at += n
        q = torch.randn(len(ctx), shape.num_heads, shape.head_dim, generator=dgen, device=DEV)
        q = q.to(DTYPE)  # [num_seqs, num_heads, head_dim]
        meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(len(ctx) + 1, dtype=torch.int32, device=DEV),
            seq_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV),
            block_tables=table.to(DEV),
            slot_mapping=torch.full((len(ctx),), -1, dtype=torch.long, device=DEV),
            max_seqlen_q=1,
            max_seqlen_k=max(ctx),
            cu_seqlens_q_cpu=list(range(len(ctx) + 1)),
            seq_lens_cpu=list(ctx),
            num_decodes=len(ctx),
        )
        ref = paged_attention_torch(q, k_cache, v_cache, meta, scale)
        kv_bytes = sum(ctx) * shape.num_kv_heads * shape.head_dim * 2 * DTYPE.itemsize
        splits = pa.default_num_splits(len(ctx), shape.num_kv_heads, q.device)
        out = torch.empty_like(q)
        batches.append(
            Batch(name, ctx, q, meta.block_tables, meta.seq_lens, out, ref, kv_bytes, splits)
        )
    return k_cache, v_cache, batches


# ---- configs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Keywords of paged_attention_decode. Tiles are explicit (the default's too: the same
    constexprs, the same compiled kernel), so equal configs compare equal."""

    num_splits: int | None  # None: default_num_splits per batch ("auto")
    min_partition: int
    block_n: int
    num_warps: int
    num_stages: int
    k_rows: bool
    heads_first: bool = False  # the KV head on the grid's fastest axis

    @property
    def splits(self) -> tuple[int | None, int, bool]:
        return self.num_splits, self.min_partition, self.heads_first

    @property
    def tile(self) -> tuple[int, int, int, bool]:
        return self.block_n, self.num_warps, self.num_stages, self.k_rows

    @property
    def name(self) -> str:
        if self.num_splits is None:
            splits = "auto"
        elif self.num_splits == 1:
            splits = "1"  # min_partition has no effect on one split
        else:
            splits = f"{self.num_splits}x{self.min_partition}"
        splits += "H" if self.heads_first else ""
        tile = f"n{self.block_n}w{self.num_warps}s{self.num_stages}"
        return f"{splits} {tile}{'K' if self.k_rows else ''}"


def config_of(splits: tuple[int | None, int, bool], tile: tuple[int, int, int, bool]) -> Config:
    """The Config of a (num_splits, min_partition, heads_first) and a tile."""
    num_splits, min_partition, heads_first = splits
    return Config(num_splits, min_partition, *tile, heads_first=heads_first)


def default_config(head_dim: int) -> Config:
    """What paged_attention_decode does when given no knob."""
    block_n = pa.default_block_n(head_dim, DTYPE)
    return Config(None, pa.MIN_PARTITION, block_n, 4, 2, False, heads_first=True)


def split_settings(smoke: bool) -> list[tuple[int | None, int, bool]]:
    """Stage 1's (num_splits, min_partition, heads_first); None = default_num_splits per
    batch. Each split setting with the KV head on the grid's slow axis (today) and fast."""
    if smoke:  # partitions short enough that tiny contexts do split
        pairs = [(None, pa.MIN_PARTITION), (1, pa.MIN_PARTITION), (4, 16), (2, 32)]
    else:
        more = [(s, p) for s in (2, 4, 8) for p in (128, 256, 512)]
        pairs = [(None, pa.MIN_PARTITION), (1, pa.MIN_PARTITION), *more]
    return [(s, p, h) for h in (False, True) for s, p in pairs]


def tile_settings(smoke: bool) -> list[tuple[int, int, int, bool]]:
    """Stage 2's (block_n, num_warps, num_stages, k_rows), the default tile first."""
    if smoke:
        return [(64, 4, 2, False), (32, 4, 3, True), (128, 8, 2, False)]
    # 8 warps on a [16, 32] score tile leave most threads idle; k_rows is the less likely win,
    # so it gets fewer variants and comes last (the budget cuts from the end). 128 keys x 4
    # stages may not fit shared memory: n/a if so.
    plain = [(n, w, s, False) for n in (64, 128, 32) for w in (4, 8) for s in (2, 3, 4)]
    k_rows = [(n, w, s, True) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
    return [t for t in plain if t[:2] != (32, 8)] + k_rows + [(32, 4, 3, True)]


# ---- measuring ----------------------------------------------------------------------------------
def time_us(fn, iters: int, flush: torch.Tensor | None) -> float:
    """Median microseconds of `iters` calls after WARMUP. On the GPU every call is timed by CUDA
    events after an L2 flush and a busy wait, all queued ahead, one sync at the end."""
    for _ in range(WARMUP):
        fn()
    if not ON_GPU:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, end in events:
        # a read, not a write: dirty lines would be written back during the timed launch
        flush.amax()
        torch.cuda._sleep(BUSY_CYCLES)  # the launch below is queued before the GPU gets there
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def measure(cfg: Config, batches, k_cache, v_cache, scale, args, flush) -> dict:
    """-> {batch name: cell}, cell = dict(status="ok" | "WRONG" | "n/a", us, tb_s, max_err,
    error). A config that fails to compile or launch is n/a on every batch."""
    kw = asdict(cfg)
    cells = {}
    for b in batches:

        def run(b=b):
            return pa.paged_attention_decode(
                b.q, k_cache, v_cache, b.block_tables, b.seq_lens, scale, out=b.out, **kw
            )

        try:
            b.out.fill_(float("nan"))  # a launch that writes nothing must fail the check
            run()
            sync()
            err = (b.out.float() - b.ref.float()).abs().max().item()
            if not err <= args.tol:  # NaN too
                cells[b.name] = dict(status="WRONG", max_err=err)
                continue
            us = time_us(run, args.iters, flush)
        except Exception as e:  # out of shared memory, a compile error: n/a, not the end
            error = f"{type(e).__name__}: {str(e)[:300]}"
            return {bb.name: dict(status="n/a", error=error) for bb in batches}
        cells[b.name] = dict(status="ok", us=us, tb_s=b.kv_bytes / us / 1e6, max_err=err)
    return cells


def geomean(cells: dict) -> float | None:
    """Geometric mean of TB/s over the batches; None unless every batch measured ok."""
    if not cells or any(c["status"] != "ok" for c in cells.values()):
        return None
    return math.exp(statistics.fmean(math.log(c["tb_s"]) for c in cells.values()))


# ---- the sweep ----------------------------------------------------------------------------------
class Sweep:
    """Measured configs in order, each once, until the time budget runs out."""

    def __init__(self, batches, k_cache, v_cache, shape, args, say, out_dir, t_start):
        self.batches, self.k_cache, self.v_cache = batches, k_cache, v_cache
        self.shape, self.args, self.say, self.out_dir = shape, args, say, out_dir
        self.scale = shape.head_dim**-0.5
        self.default = default_config(shape.head_dim)
        self.deadline = t_start + args.budget_s
        self.t_start = t_start
        self.rows: dict[Config, dict] = {}  # config -> its JSON row
        self.skipped: list[str] = []
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEV) if ON_GPU else None

    def run(self, stage: int, configs: list[Config], reserve_s: float = 0.0) -> None:
        """Measure `configs` in order, starting none after the deadline less `reserve_s`."""
        for cfg in configs:
            if cfg in self.rows:
                continue
            name = cfg.name
            if time.perf_counter() > self.deadline - reserve_s:
                self.skipped.append(name)
                continue
            t0 = time.perf_counter()
            cells = measure(
                cfg, self.batches, self.k_cache, self.v_cache, self.scale, self.args, self.flush
            )
            seconds = time.perf_counter() - t0
            row = dict(
                name=name,
                stage=stage,
                config=asdict(cfg),
                seconds=seconds,
                cells=cells,
                geomean_tb_s=geomean(cells),
            )
            self.rows[cfg] = row
            tb_s = "  ".join(f"{b}={cell_text(c)}" for b, c in cells.items())
            self.say(f"  [{stage}] {name:<18} {tb_s}  ({seconds:.1f} s)")
            self.write_json()
        if self.skipped:
            self.say(f"  budget spent: {len(self.skipped)} configs not run so far")

    def ranked(self, key=lambda cfg: True) -> list[Config]:
        """Configs with a geometric mean, fastest first."""
        ok = [c for c, r in self.rows.items() if r["geomean_tb_s"] is not None and key(c)]
        return sorted(ok, key=lambda c: -self.rows[c]["geomean_tb_s"])

    def write_json(self) -> None:
        doc = dict(
            device=torch.cuda.get_device_name() if ON_GPU else "cpu (TRITON_INTERPRET)",
            torch=torch.__version__,
            triton=version("triton"),
            shape=asdict(self.shape),
            dtype=str(DTYPE),
            block_size=BLOCK_SIZE,
            iters=self.args.iters,
            tol=self.args.tol,
            wall_s=time.perf_counter() - self.t_start,
            batches=[b.summary() for b in self.batches],
            configs=list(self.rows.values()),
            skipped=self.skipped,
        )
        (self.out_dir / "decode_sweep.json").write_text(json.dumps(doc, indent=1))


def cell_text(cell: dict) -> str:
    return f"{cell['tb_s']:.3g}" if cell["status"] == "ok" else cell["status"]


def report(sweep: Sweep, say) -> None:
    """The table (TB/s, fastest geometric mean first), then the best config against the
    default."""
    names = [b.name for b in sweep.batches]
    rows = [sweep.rows[c] for c in sweep.ranked()]
    rows += [r for r in sweep.rows.values() if r["geomean_tb_s"] is None]
    default = sweep.rows.get(sweep.default)
    base = default and default["geomean_tb_s"]
    say("\n| config | stage | " + " | ".join(names) + " | geomean | vs default |")
    say("|---" * (len(names) + 4) + "|")
    for r in rows:
        g = r["geomean_tb_s"]
        ratio = f"{g / base:.3f}" if g and base else ""
        cells = " | ".join(cell_text(r["cells"][n]) for n in names)
        mean = f"{g:.4g}" if g else "-"
        say(f"| {r['name']} | {r['stage']} | {cells} | {mean} | {ratio} |")
    ranked = sweep.ranked()
    if not ranked:
        say("\nno config measured ok on every batch")
        return
    best = sweep.rows[ranked[0]]
    say(f"\nbest overall (geomean of TB/s): {best['name']}  {best['geomean_tb_s']:.4g} TB/s")
    if base:
        per_batch = ", ".join(
            f"{n} {default['cells'][n]['us']:.0f} -> {best['cells'][n]['us']:.0f}" for n in names
        )
        say(
            f"  vs default ({default['name']}): {best['geomean_tb_s'] / base:.3f}x; "
            f"us per batch, default -> best: {per_batch}"
        )
    for n in names:
        ok = [r for r in sweep.rows.values() if r["cells"][n]["status"] == "ok"]
        top = max(ok, key=lambda r: r["cells"][n]["tb_s"], default=None)
        if top:
            say(f"  best on {n:<12} {top['name']:<18} {top['cells'][n]['tb_s']:.3g} TB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per cell (default 20)")
    ap.add_argument("--tol", type=float, default=3e-2, help="max |out - ref| allowed (bf16)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=130.0,
        help="start no new config after this many seconds from the start (default 130)",
    )
    ap.add_argument(
        "--reserve-s",
        type=float,
        default=20.0,
        help="of the budget, what stage 2 leaves to stage 3 (default 20)",
    )
    args = ap.parse_args()
    args.iters = args.iters or (2 if args.smoke else 20)
    t_start = time.perf_counter()
    out_dir, say = output("decode_sweep")

    shape = SMOKE_SHAPE if args.smoke else QWEN3_0_6B
    device = torch.cuda.get_device_name() if ON_GPU else "CPU interpreter"
    say(f"{device}  torch {torch.__version__}  triton {version('triton')}  {shape}")
    k_cache, v_cache, batches = build_batches(batch_contexts(args.smoke), shape)
    for b in batches:
        s = b.summary()
        say(
            f"  {b.name:<12} {s['num_seqs']:>5} seqs, context {s['context_min']}.."
            f"{s['context_max']} (median {s['context_median']}), KV {b.kv_bytes / 1e9:.3f} GB, "
            f"default num_splits {s['default_num_splits']}"
        )
    say(
        f"setup {time.perf_counter() - t_start:.1f} s; per config: TB/s per batch, then the "
        "seconds it took (compile, checks, timing)"
    )
    sweep = Sweep(batches, k_cache, v_cache, shape, args, say, out_dir, t_start)

    def elapsed() -> str:
        return f"at {time.perf_counter() - t_start:.0f} s"

    say(f"\n== stage 1: split settings at the default tiles ({elapsed()})")
    default_tile = sweep.default.tile
    sweep.run(1, [config_of(splits, default_tile) for splits in split_settings(args.smoke)])
    splits_ranked = list(dict.fromkeys(c.splits for c in sweep.ranked()))
    best_splits = splits_ranked[0] if splits_ranked else sweep.default.splits

    best_name = config_of(best_splits, default_tile).name.split()[0]
    say(f"\n== stage 2: tiles at splits {best_name} ({elapsed()})")
    tiles = tile_settings(args.smoke)
    sweep.run(2, [config_of(best_splits, t) for t in tiles], reserve_s=args.reserve_s)
    at_best = sweep.ranked(lambda c: c.splits == best_splits)
    tiles_ranked = list(dict.fromkeys(c.tile for c in at_best))[: 1 if args.smoke else 3]

    say(f"\n== stage 3: the best tiles at the best split settings and at 1 split ({elapsed()})")
    top_splits = list(
        dict.fromkeys([*splits_ranked[: 2 if args.smoke else 3], (1, pa.MIN_PARTITION, False)])
    )
    sweep.run(3, [config_of(s, t) for t in tiles_ranked for s in top_splits])

    wall = time.perf_counter() - t_start
    sweep.write_json()
    say(f"\n## decode_sweep ({device}{', smoke' if args.smoke else ''}), {wall:.0f} s")
    report(sweep, say)


if __name__ == "__main__":
    main()
