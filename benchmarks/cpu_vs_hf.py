"""CPU: output tokens/s of LLM.generate with the default model on sample_data prompts, next to
transformers' batched `generate` on the same prompts, weights and machine, in the same run.

Both decode greedily for exactly --max-tokens tokens per prompt (EOS ignored), so they do the
same work. transformers runs left-padded batches of --hf-batch prompts.
    python3 benchmarks/cpu_vs_hf.py [--max-tokens 64] [--hf-batch 64] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="sample_data/prompts.jsonl")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.limit]

    llm = LLM(device="cpu")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t_ours = time.perf_counter() - t0
    n_ours = sum(len(o.outputs[0].token_ids) for o in outs)

    tok = llm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    del llm
    n_hf, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch):
        batch = tok(prompts[i : i + args.hf_batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(
                **batch,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        n_hf += (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    t_hf = time.perf_counter() - t0
    print("| engine | prompts | output tokens | seconds | output tok/s |")
    print("|---|---|---|---|---|")
    print(
        f"| tokenmill LLM.generate | {len(prompts)} | {n_ours} | {t_ours:.1f} | "
        f"{n_ours / t_ours:.1f} |"
    )
    print(
        f"| transformers generate (batch {args.hf_batch}) | {len(prompts)} | {n_hf} | "
        f"{t_hf:.1f} | {n_hf / t_hf:.1f} |"
    )
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
