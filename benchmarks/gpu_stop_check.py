"""Requests that stop by themselves, on the GPU path, against transformers on the same GPU.

Every earlier GPU check ran with `ignore_eos` or fixed lengths, so none saw a request run past
its end-of-sequence token. This one checks natural stops (EOS, stop_token_ids, stop strings,
min_tokens, n > 1, seeded sampling) through the Triton kernels, CUDA graphs and overlapped steps,
with more requests than max_num_seqs, in several engine modes:

    default   triton kernels + CUDA graphs + overlapped steps
    eager     enforce_eager=True (overlap still on)
    no-ovl    graphs on, overlapped steps off
    torch     the pure-torch attention backend

1. tiny random float32 models whose EOS is a token the model actually produces (chosen from a
   dry run), so many requests stop on it;
2. the default model (SmolLM2-135M-Instruct, float32 greedy, the 55 chat prompts of
   sample_data/prompts.jsonl, max_tokens 64) when its GGUF path is given:
   `python3 benchmarks/gpu_stop_check.py [--skip-tiny] [--modes=a,b] [SmolLM2...Q4_1.gguf]`

Prints one table; exits non-zero on any mismatch. Runs on CPU too (device=cpu), for a smoke test.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import make_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "default": dict(),
    "eager": dict(enforce_eager=True),
    "no-ovl": dict(),  # can_overlap switched off after construction
    "torch": dict(attention_backend="torch", enforce_eager=True),
}

MODES_TO_RUN = list(MODES)  # --modes=default,eager picks some


@torch.inference_mode()
def hf_generate(model, prompt: list[int], max_new: int, eos: list[int] | None) -> list[int]:
    """transformers greedy; the output up to and including the first stop token.

    eos=None: transformers' own choice (the model's generation config), the reference that
    matters: a check that hands our EOS ids to transformers cannot see a wrong EOS."""
    if eos is None:
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    if eos:
        for i, t in enumerate(out):
            if t in eos:
                return out[: i + 1]
    return out


def make_llm(model: str, mode: str, **engine) -> LLM:
    llm = LLM(model=model, dtype="float32", device=DEVICE, **{**MODES[mode], **engine})
    if mode == "no-ovl":
        llm.runner.can_overlap = False
    elif DEVICE == "cpu":
        llm.runner.can_overlap = True  # the GPU's bookkeeping, on CPU (a smoke test)
    return llm


def first_diff(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at {i}: ours {a[max(0, i - 2) : i + 4]} hf {b[max(0, i - 2) : i + 4]}"


def tiny_model_with_live_eos(tmp: str) -> tuple[Path, list[list[int]], int]:
    """A tiny llama whose EOS is the token greedy decoding produces most often."""
    d = make_tiny_model(
        tmp, arch="llama", hidden_size=64, head_dim=16, max_position_embeddings=1024
    )
    prompts = [
        [(13 * i + 7 * j) % 300 + 5 for j in range(n)]
        for i, n in enumerate(
            [3, 17, 33, 64, 5, 120, 48, 250, 1, 90, 7, 11, 29, 61, 2, 40, 80, 9, 15, 33] * 2
        )
    ]
    hf = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager"
    ).to(DEVICE)
    counts: collections.Counter = collections.Counter()
    for p in prompts[:20]:
        out = hf_generate(hf, p, 40, [-1])  # no stop: see what the model produces
        counts.update(set(out[2:]))  # tokens that occur after the first two steps
    eos = counts.most_common(1)[0][0]
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 2]}))
    return d, prompts, eos


def check_tiny(rows: dict, failures: list) -> None:
    d, prompts, eos = tiny_model_with_live_eos(tempfile.mkdtemp())
    hf = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager"
    ).to(DEVICE)
    eos_ids = [eos, 2]  # the config's EOS and the tokenizer's </s>
    ref = [hf_generate(hf, p, 48, None) for p in prompts]
    num_stopped = sum(1 for r in ref if r and r[-1] in eos_ids)
    stop_tok = collections.Counter(t for r in ref for t in r).most_common(3)[-1][0]
    ref_stop_ids = [hf_generate(hf, p, 48, eos_ids + [stop_tok]) for p in prompts]
    del hf
    for mode in MODES_TO_RUN:
        llm = make_llm(str(d), mode, max_num_seqs=8, kv_cache_memory="64MiB")
        assert llm.eos_token_ids == frozenset(eos_ids), llm.eos_token_ids
        greedy = SamplingParams(temperature=0, max_tokens=48)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        bad = [
            (i, first_diff(o.outputs[0].token_ids, r))
            for i, (o, r) in enumerate(zip(outs, ref))
            if o.outputs[0].token_ids != r
            or o.outputs[0].finish_reason != ("stop" if r[-1] in eos_ids else "length")
        ]
        # stop_token_ids: stops at the extra id too, reported as stop_reason
        outs2 = llm.generate(
            prompts,
            SamplingParams(temperature=0, max_tokens=48, stop_token_ids=[stop_tok]),
            use_tqdm=False,
        )
        bad2 = [
            i for i, (o, r) in enumerate(zip(outs2, ref_stop_ids)) if o.outputs[0].token_ids != r
        ]
        # min_tokens: EOS masked for the first 10 outputs, then the same rule
        outs3 = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=48, min_tokens=10), use_tqdm=False
        )
        bad3 = [
            i
            for i, o in enumerate(outs3)
            if len(o.outputs[0].token_ids) < 10
            or any(t in eos_ids for t in o.outputs[0].token_ids[:-1])
        ]
        # n > 1 with seeds: reproducible, and every completion ends at its first EOS
        sp = SamplingParams(temperature=1.0, top_p=0.9, n=3, seed=11, max_tokens=48)
        a = llm.generate(prompts[:12], sp, use_tqdm=False)
        b = llm.generate(prompts[:12], sp, use_tqdm=False)
        toks_a = [[c.token_ids for c in o.outputs] for o in a]
        bad4 = toks_a != [[c.token_ids for c in o.outputs] for o in b] or any(
            any(t in eos_ids for t in c.token_ids[:-1])
            or (c.finish_reason == "stop") != (bool(c.token_ids) and c.token_ids[-1] in eos_ids)
            for o in a
            for c in o.outputs
        )
        assert llm.num_free_blocks == llm.num_kv_blocks and not llm.has_unfinished_requests()
        rows[f"tiny/{mode}"] = (
            f"eos {len(prompts) - len(bad)}/{len(prompts)} (hf stops {num_stopped}), "
            f"stop_ids {len(prompts) - len(bad2)}/{len(prompts)}, "
            f"min_tokens {'ok' if not bad3 else bad3}, n=3 seeded {'ok' if not bad4 else 'BAD'}"
        )
        if bad or bad2 or bad3 or bad4:
            failures.append((f"tiny/{mode}", bad[:3], bad2[:3], bad3[:3], bad4))
        del llm
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def chat_prompts(llm: LLM) -> list[list[int]]:
    rows = [json.loads(line) for line in (ROOT / "sample_data/prompts.jsonl").open()]
    return [llm.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]


def check_default_model(gguf: str, rows: dict, failures: list) -> None:
    ref = None
    for mode in MODES_TO_RUN:
        llm = make_llm(gguf, mode, max_num_seqs=16)
        prompts = chat_prompts(llm)
        if ref is None:
            hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32)
            hf = hf.to(DEVICE)
            ref = [hf_generate(hf, p, 64, None) for p in prompts]
            del hf
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
        same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref))
        past_eos = sum(
            any(t in llm.eos_token_ids for t in o.outputs[0].token_ids[:-1]) for o in outs
        )
        bad = [
            (i, first_diff(o.outputs[0].token_ids, r), o.outputs[0].finish_reason)
            for i, (o, r) in enumerate(zip(outs, ref))
            if o.outputs[0].token_ids != r
        ]
        # a stop string ends the text and is reported as the stop reason
        s = llm.generate(
            prompts[:8],
            SamplingParams(temperature=0, max_tokens=64, stop=[" the"]),
            use_tqdm=False,
        )
        bad_stop = [
            i
            for i, o in enumerate(s)
            if o.outputs[0].stop_reason == " the" and " the" in o.outputs[0].text
        ]
        rows[f"smollm2/{mode}"] = (
            f"{same}/{len(prompts)} identical to transformers (EOS {sorted(llm.eos_token_ids)}, "
            f"{past_eos} past it); stop strings "
            f"{'ok' if not bad_stop else bad_stop}"
        )
        if bad or bad_stop:
            failures.append((f"smollm2/{mode}", bad[:5], bad_stop))
        del llm
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    rows: dict = {}
    failures: list = []
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for a in sys.argv[1:]:
        if a.startswith("--modes="):
            MODES_TO_RUN[:] = a.split("=", 1)[1].split(",")
    if "--skip-tiny" not in sys.argv:
        check_tiny(rows, failures)
    if args:
        check_default_model(args[0], rows, failures)
    for f in failures:
        print("FAIL", f)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"\n| {name} | result |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    sys.exit(1 if failures else 0)
