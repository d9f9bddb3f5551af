"""Per-step kernel arguments stay unspecialized (kernels/specialize.py): a batch's row count,
the block table's width or a slice's offset must never trigger a Triton compile mid-run.

The flags live on the compiled-kernel objects, which the Triton interpreter (the CPU mode of
this test suite) does not build: the check imports the kernels in a fresh process without it."""

import json
import os
import subprocess
import sys

import triton

from tokenmill.kernels.specialize import runtime_args

RUNTIME = {
    "paged_attention._varlen_kernel": ["stride_bt_seq", "block_tables_ptr", "seq_lens_ptr"],
    "paged_attention._decode_kernel": ["stride_bt_seq", "num_splits", "min_partition"],
    "paged_attention._decode_reduce_kernel": ["num_splits"],
    "rejection_sampling._round_kernel": ["num_seqs"],
    "rejection_sampling._final_kernel": ["num_seqs"],
    "threshold_search._pass_kernel": ["num_seqs"],
    "threshold_search._finish_kernel": ["num_seqs"],
    "rmsnorm._rmsnorm_kernel": ["num_rows"],
    "fused_moe._moe_gemm_kernel": ["num_pairs"],
}

PROBE = """
import importlib, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    module, kernel = name.split(".")
    fn = getattr(importlib.import_module("tokenmill.kernels." + module), kernel)
    out[name] = {p.name: [p.do_not_specialize, getattr(p, "do_not_specialize_on_alignment", None)]
                 for p in fn.params}
print(json.dumps(out))
"""


def _two_args(p, n):
    pass


def test_runtime_args_keywords():
    kw = runtime_args(ints=["n"], pointers=["p"])
    assert kw["do_not_specialize"] == ["n"]
    if "do_not_specialize_on_alignment" in kw:
        assert kw["do_not_specialize_on_alignment"] == ["n", "p"]
    # this Triton accepts them (a def, not a lambda: Triton 3.6 cannot jit a lambda's source)
    triton.jit(**kw)(_two_args)


def test_per_step_arguments_are_not_specialized():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(RUNTIME))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    flags = json.loads(done.stdout)
    for kernel, names in RUNTIME.items():
        for name in names:
            value, alignment = flags[kernel][name]
            if name.endswith("_ptr"):
                assert alignment in (True, None), (kernel, name)  # None: Triton < 3.2
            else:
                assert value, (kernel, name)
                assert alignment in (True, None), (kernel, name)
        # data read in wide vectors keeps its alignment specialization
        for name in ("q_ptr", "k_cache_ptr", "logits_ptr", "x_ptr"):
            if name in flags[kernel]:
                assert not flags[kernel][name][0] and flags[kernel][name][1] in (False, None)
