"""`tokenmill generate --tensor-parallel-size 2` end to end on the CPU (gloo): the same rows as
one process."""

from __future__ import annotations

from test_generate import SAMPLES, generate, rows

from tokenmill.io import exit_codes


def test_generate_with_two_ranks_writes_the_single_process_rows(tiny_model_dir, tmp_path):
    results = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.jsonl"
        args = (SAMPLES / "prompts.jsonl", "-o", out, "--tensor-parallel-size", tp)
        result = generate(tiny_model_dir, *args)
        assert result.exit_code == exit_codes.OK, result.output
        results[tp] = [(r["id"], r["text"], r["output_tokens"]) for r in rows(out)]
    assert results[2] == results[1]
    assert all(n == 4 for _, _, n in results[2])
