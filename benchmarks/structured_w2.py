"""GPU cost of a JSON-schema constraint on W2-sized traffic (issue 10), with the default model.

    PYTHONPATH=. python3 benchmarks/structured_w2.py MODEL [--num-prompts 2000]
        [--grammar-threads N] [--arch qwen3-0.6b]

`--arch A` runs W2's own model shape (issue 8 defines W2 on qwen3-0.6b) with random weights
made on the card (load_format="dummy") and MODEL's tokenizer: the grammar sees MODEL's
vocabulary, the logits are the preset's width (ids past the tokenizer's are never allowed).
Without it the run uses MODEL itself (the default model's 135M shape: its steps are host time,
which the constraint's fill adds to).

Prompts: the `mixed` workload's 2,000 log-normal prompts (random token ids), T 0.8, top-p 0.95.
1. constrained: every request under sample_data/person.schema.json (max_tokens 256);
2. the same prompts unconstrained, each request given exactly the output length it had in run 1
   (ignore_eos), so both runs schedule the same tokens and only the constraint differs.
The ratio of the two walls is the constraint's cost. Also printed: host ms per step (the wall
less the time spent waiting for sampled tokens), the mask fill's share, and how many steps
sampled behind their forward pass (constrained rows keep step overlap), and a table of the
host's milliseconds per step in each engine phase with the sampler kernels' device time (where
a constrained step's time goes), then the cost ratio.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import shutil
import time
from pathlib import Path

from tokenmill.cli import threads as cpu_threads

# As under the CLI (cli/app.py, cli/threads.py): torch's OpenMP threads sleep when idle instead
# of spinning on the cores the grammar-fill threads need, and their number follows the CPUs
# this process may use. Read once by OpenMP, so before torch loads.
cpu_threads.prefer_passive_wait()

import torch  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.workloads import mixed_workload  # noqa: E402
from tokenmill.engine import structured_output  # noqa: E402
from tokenmill.engine.sampling_params import StructuredOutputsParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class HostClock:
    """The structured-output fill (advance matchers + masks) and the steps whose sampling was
    deferred behind the forward pass (wraps the manager's fill and the runner's execute_async).
    The wait for sampled tokens comes from Phases ("  collect (wait)")."""

    def __init__(self, llm: LLM):
        self.fill_s = self.advance_s = 0.0
        self.fill_rows = self.deferred = 0
        runner, manager = llm.runner, llm.runner.structured
        fill, execute = manager.fill, runner.execute_async

        def timed_fill(reqs):
            t0 = time.perf_counter()
            masks = fill(reqs)
            self.fill_s += time.perf_counter() - t0
            self.fill_rows += 0 if masks is None else masks.bitmask.shape[0]
            return masks

        def counted_execute(sched, defer_sampling=False):
            self.deferred += defer_sampling
            return execute(sched, defer_sampling)

        manager.fill, runner.execute_async = timed_fill, counted_execute
        advance = structured_output.advance_matchers

        def timed_advance(states, reqs):
            t0 = time.perf_counter()
            advance(states, reqs)
            self.advance_s += time.perf_counter() - t0

        structured_output.advance_matchers = timed_advance  # fill looks it up at each call

    def snapshot(self) -> tuple[float, int, int, float]:
        return self.fill_s, self.fill_rows, self.deferred, self.advance_s


class Phases:
    """Host seconds inside each engine phase, and the device time of the sampling launches.

    Phases nest as the engine calls them (indented under their caller): execute_async holds
    prepare, forward and (when not deferred: every unconstrained step) sample_async;
    sample_async holds the grammar apply (fill + mask upload + kernel) and the sampler's
    launches; land holds collect (the wait for sampled tokens), the scheduler update and the
    output processing. "other" is the wall less the time inside outermost phases: the step
    loop's own Python."""

    NAMES = [
        ("schedule", "scheduler", "schedule"),
        ("execute_async", "runner", "execute_async"),
        ("  prepare", "runner", "prepare"),
        ("  forward", "runner", "_forward"),
        ("sample_async", "runner", "sample_async"),
        ("  grammar apply", "structured", "apply"),
        ("  sampler", "sampler", "sample"),
        ("land", "llm", "_land"),
        ("  collect (wait)", "runner", "collect"),
        ("  update", "scheduler", "update_from_output"),
        ("  outputs", "outputs", "process"),
    ]

    def __init__(self, llm: LLM):
        owners = {
            "scheduler": llm.scheduler,
            "runner": llm.runner,
            "structured": llm.runner.structured,
            "sampler": llm.runner.sampler,
            "llm": llm,
            "outputs": llm.output_processor,
        }
        self.seconds = dict.fromkeys((n for n, _, _ in self.NAMES), 0.0)
        self.seconds["outermost"] = 0.0  # inside a phase that no other phase called
        self._depth = 0
        self.events: list = []  # (start, end) CUDA events around each sampler launch
        for name, owner, attr in self.NAMES:
            self._wrap(owners[owner], attr, name)

    def _wrap(self, obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)
        cuda = name == "  sampler" and torch.cuda.is_available()

        def call(*args, **kwargs):
            self._depth += 1
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._depth -= 1
                self.seconds[name] += dt
                if self._depth == 0:
                    self.seconds["outermost"] += dt
                if cuda:
                    end.record()
                    self.events.append((start, end))

        setattr(obj, attr, call)

    def snapshot(self) -> tuple[dict[str, float], float]:
        sync()
        device_ms = sum(a.elapsed_time(b) for a, b in self.events)
        return dict(self.seconds), device_ms

    @staticmethod
    def table(runs: list[tuple[str, dict[str, float], float, int, float]]) -> str:
        """runs: (name, seconds by phase, sampling device ms, steps, wall s) -> markdown."""
        head = "| phase (ms/step) | " + " | ".join(r[0] for r in runs) + " |"
        lines = [head, "|---" * (len(runs) + 1) + "|"]
        for name, _, _ in Phases.NAMES:
            cells = [f"{1e3 * sec[name] / steps:.2f}" for _, sec, _, steps, _ in runs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        other = [f"{1e3 * (w - sec['outermost']) / steps:.2f}" for _, sec, _, steps, w in runs]
        lines.append("| other (wall less the outermost phases) | " + " | ".join(other) + " |")
        dev = [f"{ms / steps:.2f}" for _, _, ms, steps, _ in runs]
        lines.append("| sampler kernels on the device | " + " | ".join(dev) + " |")
        return "\n".join(lines)


def preset_with_tokenizer(arch: str, model: Path) -> str:
    """A config-only checkpoint of the preset `arch` with `model`'s tokenizer and generation
    config (its EOS ids) beside it: every metadata file the engine reads but config.json."""
    from tokenmill.bench.presets import make_dummy_checkpoint
    from tokenmill.engine.hub import META_PATTERNS

    out = make_dummy_checkpoint(arch, weights=False)
    for f in model.iterdir():
        if f.is_file() and f.name != "config.json":
            if any(fnmatch.fnmatch(f.name, p) for p in META_PATTERNS):
                shutil.copy(f, out / f.name)
    return str(out)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llm: LLM, clock: HostClock, phases: Phases, prompts, params) -> tuple[float, list, dict]:
    s0 = copy.copy(llm.stats)
    c0 = clock.snapshot()
    p0, d0 = phases.snapshot()
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t0
    s1 = llm.stats
    fill_s, fill_rows, deferred, advance_s = (b - a for a, b in zip(c0, clock.snapshot()))
    p1, d1 = phases.snapshot()
    wait_s = p1["  collect (wait)"] - p0["  collect (wait)"]
    steps = s1.num_steps - s0.num_steps
    return (
        wall,
        outs,
        {
            "steps": steps,
            "graph": s1.graph_steps - s0.graph_steps,
            "eager": s1.eager_steps - s0.eager_steps,
            "mean_batch": (s1.num_scheduled_seqs_total - s0.num_scheduled_seqs_total) / steps,
            "host_ms": 1000 * (wall - wait_s) / steps,
            "fill_ms": 1000 * fill_s / steps,
            "fill_us_row": 1e6 * fill_s / fill_rows if fill_rows else 0.0,
            "advance_us_row": 1e6 * advance_s / fill_rows if fill_rows else 0.0,
            "deferred": deferred,
            "phases": {k: p1[k] - p0[k] for k in p1},
            "sampler_device_ms": d1 - d0,
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument(
        "--grammar-threads",
        type=int,
        default=None,
        help="mask-fill threads (default: the engine's)",
    )
    ap.add_argument(
        "--arch",
        default=None,
        help="a bench preset (qwen3-0.6b: W2's shape) with random weights and MODEL's tokenizer",
    )
    args = ap.parse_args()
    cpu_threads.configure(None)  # torch CPU threads as `tokenmill generate` sets them
    import jsonschema

    schema = json.loads((ROOT / "sample_data/person.schema.json").read_text())
    # no prefix caching: run 2 must not find run 1's prompts cached
    if args.arch:
        llm = LLM(preset_with_tokenizer(args.arch, Path(args.model)), load_format="dummy",
                  enable_prefix_caching=False)  # fmt: skip
    else:
        llm = LLM(args.model, enable_prefix_caching=False)
    vocab = min(10_000, llm.hf_config.vocab_size)
    prompts = [r.prompt for r in mixed_workload(args.num_prompts, vocab, seed=0).requests]
    constrained = SamplingParams(
        temperature=0.8,
        top_p=0.95,
        max_tokens=256,
        seed=0,
        structured_outputs=StructuredOutputsParams(json=schema),
    )
    if args.grammar_threads:
        llm.runner.structured.num_threads = args.grammar_threads  # before the first fill
    clock = HostClock(llm)
    phases = Phases(llm)
    # Warm-up: the whole constrained pass, untimed. NOTE: an 8-prompt warm-up left Triton
    # compiles for the workload's shapes inside the timed constrained pass, which ran first, and
    # inflated the constraint's cost (benchmarks/RESULTS.md, fourth session).
    llm.generate(prompts, constrained, use_tqdm=False)
    wall_c, outs_c, st_c = timed(llm, clock, phases, prompts, constrained)
    lens = [len(o.outputs[0].token_ids) for o in outs_c]
    valid = 0
    for o in outs_c:
        try:
            jsonschema.validate(json.loads(o.outputs[0].text), schema)
            valid += 1
        except Exception:
            pass
    plain = [
        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=n, ignore_eos=True, seed=0)
        for n in lens
    ]
    llm.generate(prompts[:8], plain[:8], use_tqdm=False)
    wall_p, outs_p, st_p = timed(llm, clock, phases, prompts, plain)
    tokens = sum(lens)
    assert sum(len(o.outputs[0].token_ids) for o in outs_p) == tokens
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"card: {card}; {len(prompts)} prompts, {tokens} output tokens")
    print(f"constrained outputs valid against the schema: {valid}/{len(prompts)}")
    print(
        f"mask fill: {st_c['fill_us_row']:.1f} us per constrained row, of which "
        f"{st_c['advance_us_row']:.1f} advancing the matchers "
        f"({llm.runner.structured.num_threads} fill threads); steps that sampled after the forward "
        f"launched (overlapped grammar steps): {st_c['deferred']}/{st_c['steps']}"
    )
    print("host ms/step = wall minus the time spent waiting for sampled tokens, per step")
    print(
        "\n| run | wall s | out tok/s | steps | graph/eager | mean batch | ms/step "
        "| host ms/step | mask fill ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, wall, st in (("json schema", wall_c, st_c), ("unconstrained", wall_p, st_p)):
        print(
            f"| {name} | {wall:.2f} | {tokens / wall:,.0f} | {st['steps']} | "
            f"{st['graph']}/{st['eager']} | {st['mean_batch']:.0f} | "
            f"{1000 * wall / st['steps']:.2f} | {st['host_ms']:.2f} | {st['fill_ms']:.2f} |"
        )
    print("\nwhere a step's host time goes (and the sampler's device time):\n")
    print(
        Phases.table(
            [
                (name, st["phases"], st["sampler_device_ms"], st["steps"], wall)
                for name, wall, st in (
                    ("json schema", wall_c, st_c),
                    ("unconstrained", wall_p, st_p),
                )
            ]
        )
    )
    print(f"\nconstraint cost: {wall_c / wall_p:.2f}x the unconstrained wall")


if __name__ == "__main__":
    main()
