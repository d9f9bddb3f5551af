"""A short GPU pass over the merged engine (for a lease's last minutes): float32 greedy parity
with transformers on every tiny architecture, then one JSON-schema-constrained batch through
the device-side bitmask. Prints one table; exits non-zero on a mismatch."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import make_tiny_model  # noqa: E402
from gpu_correctness import tiny_parity  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.sampling_params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def structured() -> str:
    d = make_tiny_model(tempfile.mkdtemp(), arch="llama", hidden_size=64, head_dim=16)
    llm = LLM(model=str(d), dtype="float32", device="cuda", kv_cache_memory="256MiB")
    params = SamplingParams(
        temperature=0.7,
        seed=1,
        max_tokens=60,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    outs = llm.generate([[5 + i, 9, 11] for i in range(16)], params, use_tqdm=False)
    ok = 0
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            ok += isinstance(value.get("age"), int) and isinstance(value.get("name"), str)
    stopped = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    return f"{ok}/{stopped} finished rows parse to the schema ({len(outs)} rows)"


if __name__ == "__main__":
    rows = tiny_parity()
    parity_ok = all(v.split("/")[0] == v.split("/")[1] for v in rows.values())
    rows["json_schema (tiny llama, T=0.7)"] = structured()
    print("\n| check | result |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    sys.exit(0 if parity_ok else 1)
