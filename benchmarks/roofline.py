"""Copied from shared/tools/roofline.py so the GPU machine (which gets only the repo) can run it.

Physical floor for workload W1 (nano-vllm's bench.py draw) on a Qwen3-0.6B-shaped model.

Floor = max(FLOPs / matmul rate, bytes / memory bandwidth), bytes = weights once per decode step
+ every KV entry read once per decode step that attends to it (+ writes). Usage: roofline.py TBps TFLOPs
"""
import sys
from random import randint, seed

bw = float(sys.argv[1]) * 1e12 if len(sys.argv) > 1 else 3.35e12
fl = float(sys.argv[2]) * 1e12 if len(sys.argv) > 2 else 790e12
seed(0)
n = 256
ins = [randint(100, 1024) for _ in range(n)]
# bench.py draws prompts (token ids) first, then max_tokens
seed(0)
prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(n)]
outs = [randint(100, 1024) for _ in range(n)]
ins = [len(p) for p in prompts]
P, O = sum(ins), sum(outs)
layers, kvh, hd, hidden, inter, vocab = 28, 8, 128, 1024, 3072, 151936
kv_per_tok = 2 * layers * kvh * hd * 2
body = layers * (hidden * (16 * hd) + 2 * hidden * kvh * hd + 16 * hd * hidden + 3 * hidden * inter)
head = hidden * vocab
weights_bytes = 2 * (body + head)
kv_reads = sum(o * i + o * (o - 1) // 2 for i, o in zip(ins, outs))
steps = max(outs)
mem = steps * weights_bytes + kv_reads * kv_per_tok + (P + O) * kv_per_tok
flops = 2 * body * (P + O) + 2 * head * (O + n) + 4 * 16 * hd * layers * (sum(i * i / 2 for i in ins) + kv_reads)
t = max(mem / bw, flops / fl)
print(f"prompt tokens {P}, output tokens {O}, decode steps {steps}")
print(f"bytes {mem/1e12:.2f} TB -> {mem/bw:.2f} s at {bw/1e12:.2f} TB/s; flops {flops/1e12:.0f} T -> {flops/fl:.2f} s")
print(f"floor {t:.2f} s -> ceiling {O/t:,.0f} output tok/s")
