"""The fused q/k norm + rotary + cache write against the chains it replaces.

Two oracles: the torch references (rms_norm_reference / Gemma's norm -> rotary_reference ->
write_kv_torch) and the unfused Triton kernels (rms_norm -> apply_rotary -> write_kv).
Activations are multiples of 1/8 in [-2, 2] unless a test says otherwise: their sums of squares
are exact in fp32 whatever the summation order, so torch's mean and tl.sum agree and every
difference left is a rounding the kernel makes in the wrong place. Comparisons are bit for bit
(NaN sentinels included), except bf16 against torch in the interpreter, which truncates
fp32 -> bf16 where torch rounds (INTERPRETER_BF16_ULPS), and the unfused rotary kernel on
the GPU (ROTARY_KERNEL_ULPS).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from kernel_utils import DEVICE, ON_GPU, pick

from tokenmill.kernels.kv_cache import write_kv
from tokenmill.kernels.qk_norm_rope import (
    gemma_rms_norm_reference,
    qk_norm_rope_write_kv,
    qk_norm_rope_write_kv_reference,
)
from tokenmill.kernels.rmsnorm import rms_norm
from tokenmill.kernels.rotary import apply_rotary, rotary_cos_sin

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAX_POSITION = 64


@dataclass(frozen=True)
class Case:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rot_dim: int | None  # None: no rotary
    norm: str | None  # "llama", "gemma" or None
    block_size: int = 16
    index_dtype: torch.dtype = torch.int64  # positions and slot_mapping
    strided: bool = True  # qkv rows are a view into a wider buffer
    eps: float = 1e-6

    def __str__(self):
        rot = f"rot{self.rot_dim}" if self.rot_dim else "norot"
        idx = str(self.index_dtype).removeprefix("torch.")
        return (
            f"h{self.num_heads}kv{self.num_kv_heads}d{self.head_dim}-{rot}-{self.norm}"
            f"-bs{self.block_size}-{idx}{'-strided' if self.strided else ''}"
        )


CASES = [
    Case(4, 2, 32, 32, "llama"),  # GQA, Qwen3-style
    Case(3, 1, 16, 16, "llama", block_size=3, index_dtype=torch.int32),  # odd heads, MQA
    Case(2, 2, 64, 32, None, strided=False),  # MHA, partial rotary, no norm
    Case(4, 1, 64, 16, "gemma", block_size=3, eps=1e-5),  # partial rotary, Gemma numerics
    Case(2, 2, 32, None, "llama", index_dtype=torch.int32, eps=0.5),  # norm only, eps counts
    Case(5, 5, 16, None, None, block_size=3),  # split + cache write only
    Case(20, 4, 256, 128, "llama"),  # 20 q heads of 256: two tiles, the second partial
    Case(2, 1, 256, 256, "gemma", index_dtype=torch.int32),  # Gemma 3's head_dim
]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _assert_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    diff = _bits(actual) != _bits(expected)
    assert not diff.any(), (
        f"{what}: {int(diff.sum())} of {diff.numel()} elements differ, max "
        f"{(actual.float() - expected.float()).nan_to_num().abs().max().item():.3g}"
    )


FRACTION_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
# The interpreter truncates each fp32 -> bf16 rounding where torch rounds to nearest (one ulp
# apart). A head element goes through up to five roundings (the norm's two, rotary's two
# products and its sum) and rotary's sum can cancel, so the error is a few ulps of the head's
# largest operand, not of the element: 20 seeds x CASES gave at most 6.
INTERPRETER_BF16_ULPS = 8
# Compiled with fp fusion, rotary.py contracts its two products into one fma (qk_norm_rope.py's
# NOTE): one rounding fewer than HF, so up to an ulp off the fused kernel and torch.
ROTARY_KERNEL_ULPS = 1
# fp32 outputs after sums of squares added in different orders: 2 seen in the interpreter
# (against torch), 3 on an H200
RANDOM_FP32_ULPS = 4


def _assert_ulps(actual: torch.Tensor, expected: torch.Tensor, max_ulps: int, what: str) -> None:
    """Bit for bit when max_ulps is 0; else within max_ulps ulps of the largest |expected| in
    each head (last dim), NaN where NaN."""
    if max_ulps == 0:
        return _assert_bits(actual, expected, what)
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    a, e = actual.float().nan_to_num(), expected.float().nan_to_num()
    head_max = e.abs().amax(-1, keepdim=True).clamp_min(2.0**-100)  # [..., 1]
    ulp = torch.exp2(torch.floor(torch.log2(head_max)) - FRACTION_BITS[expected.dtype])
    ulps = ((a - e).abs() / ulp).max().item()
    assert ulps <= max_ulps, f"{what}: {ulps:.1f} ulps of its head's largest element off"


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0, grid: bool = True) -> dict:
    """The launcher's keyword arguments; caches start as NaN so untouched slots show."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = pick(7, 300)
    h, kv, d = case.num_heads, case.num_kv_heads, case.head_dim
    width = (h + 2 * kv) * d
    wide = torch.randn(num_tokens, width + 24, generator=gen) * 2
    if grid:  # multiples of 1/8: every sum of squares is exact in fp32
        wide = torch.randint(-16, 17, wide.shape, generator=gen) / 8.0
    wide = wide.to(DEVICE, dtype)
    qkv = wide[:, 8 : 8 + width] if case.strided else wide[:, :width].contiguous()
    num_slots = pick(12, 500) * case.block_size
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[1::3] = -1  # padding tokens
    cache_shape = (num_slots // case.block_size, case.block_size, kv, d)
    args = dict(
        qkv=qkv,
        positions=torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen),
        num_heads=h,
        num_kv_heads=kv,
        head_dim=d,
        k_cache=torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE),
        v_cache=torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE),
        slot_mapping=slots,
        eps=case.eps,
        gemma_norm=case.norm == "gemma",
    )
    args["positions"] = args["positions"].to(DEVICE, case.index_dtype)
    args["slot_mapping"] = args["slot_mapping"].to(DEVICE, case.index_dtype)
    if case.rot_dim is not None:
        cos, sin = rotary_cos_sin(MAX_POSITION, case.rot_dim, base=1e4, device=DEVICE)
        args.update(cos_cache=cos, sin_cache=sin)
    if case.norm is not None:
        # Llama's weight is the scale itself, Gemma's its offset from 1
        center = 1.0 if case.norm == "llama" else 0.0
        for name in ("q_weight", "k_weight"):
            w = center + 0.2 * torch.randn(d, generator=gen)
            args[name] = w.to(DEVICE, dtype)
    return args


def _with_fresh_caches(args: dict) -> dict:
    return {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}


def _unfused_kernels(args: dict) -> torch.Tensor:
    """What the engine launches today: norm kernels, rotary in place, v.contiguous(), write_kv.
    Gemma's norm has no kernel: the engine runs its torch module, as here."""
    a = args
    h, kv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    qkv = a["qkv"].clone()  # apply_rotary rotates in place
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    q, k, v = q.view(num_tokens, h, d), k.view(num_tokens, kv, d), v.view(num_tokens, kv, d)
    for name in ("q_weight", "k_weight"):
        w = a.get(name)
        if w is None:
            continue
        x = q if name == "q_weight" else k
        x = (
            gemma_rms_norm_reference(x, w, a["eps"])
            if a["gemma_norm"]
            else rms_norm(x, w, a["eps"])
        )
        q, k = (x, k) if name == "q_weight" else (q, x)
    if a.get("cos_cache") is not None:
        apply_rotary(q, k, a["positions"], a["cos_cache"], a["sin_cache"])
    write_kv(k, v.contiguous(), a["k_cache"], a["v_cache"], a["slot_mapping"])
    return q


def _check_against_oracles(args: dict) -> dict:
    """Runs the fused kernel on fresh caches, checks it against both chains, returns its args."""
    fused = _with_fresh_caches(args)
    q = qk_norm_rope_write_kv(**fused)
    assert q.shape == (args["qkv"].shape[0], args["num_heads"], args["head_dim"])
    unfused = _with_fresh_caches(args)
    ref = _with_fresh_caches(args)
    interpreter_bf16 = args["qkv"].dtype == torch.bfloat16 and not ON_GPU
    # the chain's Gemma norm is torch's (it has no kernel), which rounds bf16 where the
    # interpreter truncates; on the GPU, rotary.py contracts
    unfused_ulps = INTERPRETER_BF16_ULPS if interpreter_bf16 and args["gemma_norm"] else 0
    if ON_GPU and args.get("cos_cache") is not None:
        unfused_ulps = ROTARY_KERNEL_ULPS
    for name, expected, max_ulps in (
        ("unfused kernels", (_unfused_kernels(unfused), unfused), unfused_ulps),
        ("torch reference", (qk_norm_rope_write_kv_reference(**ref), ref), 0),
    ):
        if interpreter_bf16:
            max_ulps = max(max_ulps, INTERPRETER_BF16_ULPS)
        pairs = [(q, expected[0], "q_out")]
        pairs += [(fused[c], expected[1][c], c) for c in ("k_cache", "v_cache")]
        for actual, want, what in pairs:
            _assert_ulps(actual, want, max_ulps, f"{what} vs {name}")
    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_chain_and_unfused_kernels(case, dtype):
    fused = _check_against_oracles(_inputs(case, dtype))
    # padding tokens (-1) leave the caches alone; every real token's slot is written
    slots = fused["slot_mapping"].long()
    written = torch.zeros(fused["k_cache"].shape[:2], dtype=torch.bool).view(-1)
    written[slots[slots >= 0].cpu()] = True
    assert (slots < 0).any() and (slots >= 0).any()
    for cache in (fused["k_cache"], fused["v_cache"]):
        per_slot = cache.view(written.numel(), -1).isnan().cpu()
        assert per_slot[~written].all() and not per_slot[written].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_activations_match_the_rms_norm_kernel_bit_for_bit(dtype):
    # Gaussian activations: the sum of squares rounds, so this pins the fused kernel to
    # rmsnorm.py's reduction (the same tl.sum over a [heads, head_dim] tile, same layout).
    # fp32 sums that round differently leave inv_rms an ulp or so off and an output up to
    # RANDOM_FP32_ULPS: against torch (another summation order) everywhere, and on the GPU
    # against rmsnorm.py too (its sum of squares uses fmas: qk_norm_rope.py's NOTE).
    args = _inputs(Case(6, 2, 64, None, "llama"), dtype, seed=1, grid=False)
    fused = _with_fresh_caches(args)
    unfused = _with_fresh_caches(args)
    q = qk_norm_rope_write_kv(**fused)
    max_ulps = RANDOM_FP32_ULPS if ON_GPU and dtype == torch.float32 else 0
    _assert_ulps(q, _unfused_kernels(unfused), max_ulps, "q_out vs unfused kernels")
    _assert_ulps(fused["k_cache"], unfused["k_cache"], max_ulps, "k_cache vs unfused kernels")
    ref = _with_fresh_caches(args)
    ref_q = qk_norm_rope_write_kv_reference(**ref)
    # half types: a differently rounded sum rarely moves a rounding, by one ulp
    max_ulps = {torch.float32: RANDOM_FP32_ULPS, torch.float16: 1, torch.bfloat16: 1}[dtype]
    if dtype == torch.bfloat16 and not ON_GPU:
        max_ulps = INTERPRETER_BF16_ULPS
    _assert_ulps(q, ref_q, max_ulps, "q_out vs torch reference")


@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_q_and_k_norms_are_independent(which):
    args = _inputs(Case(4, 2, 32, 16, "llama"), torch.float16, seed=2)
    del args[which]  # only the other one normalises
    _check_against_oracles(args)


def test_gemma_and_llama_rounding_orders_are_told_apart():
    # Gemma rounds once after (h * (1 + w)); Llama's norm with weight 1 + w rounds h first.
    # In fp16 the two differ, so the exact comparisons above would catch a swapped order.
    args = _inputs(Case(4, 2, 32, 32, "gemma"), torch.float16, seed=3)
    gemma = qk_norm_rope_write_kv(**_with_fresh_caches(args))
    llama = _with_fresh_caches(args)
    llama.update(gemma_norm=False, q_weight=1 + args["q_weight"], k_weight=1 + args["k_weight"])
    assert not torch.equal(_bits(gemma), _bits(qk_norm_rope_write_kv(**llama)))
    torch.testing.assert_close(gemma, qk_norm_rope_write_kv(**llama), atol=2e-2, rtol=2e-2)


def test_writes_into_q_out_and_handles_no_tokens():
    args = _inputs(Case(3, 1, 16, 16, "llama"), torch.float32)
    q_out = torch.full((args["qkv"].shape[0], 3, 16), float("nan"), device=DEVICE)
    assert qk_norm_rope_write_kv(**_with_fresh_caches(args), q_out=q_out) is q_out
    _assert_bits(q_out, qk_norm_rope_write_kv_reference(**_with_fresh_caches(args)), "q_out")
    empty = _with_fresh_caches(args)
    empty.update(qkv=args["qkv"][:0], positions=args["positions"][:0])
    empty["slot_mapping"] = args["slot_mapping"][:0]
    assert qk_norm_rope_write_kv(**empty).shape == (0, 3, 16)
    assert empty["k_cache"].isnan().all()


def test_position_zero_without_norm_is_a_split():
    # cos = 1, sin = 0: q comes back unchanged, k and v land in the cache unchanged
    args = _inputs(Case(2, 2, 32, 32, None), torch.bfloat16)
    args["positions"] = torch.zeros_like(args["positions"])
    slots = args["slot_mapping"]
    q = qk_norm_rope_write_kv(**args)
    qkv = args["qkv"].view(-1, 6, 32)
    _assert_bits(q, qkv[:, :2], "q_out")
    keep = slots >= 0
    _assert_bits(args["k_cache"].view(-1, 2, 32)[slots[keep]], qkv[keep, 2:4], "k")
    _assert_bits(args["v_cache"].view(-1, 2, 32)[slots[keep]], qkv[keep, 4:], "v")


def _rejects(match: str, **changes) -> None:
    args = _inputs(Case(4, 2, 32, 16, "llama"), torch.float32)
    args.update(changes)
    with pytest.raises(AssertionError, match=match):
        qk_norm_rope_write_kv(**args)


def test_launcher_asserts_say_what_to_change():
    args = _inputs(Case(4, 2, 32, 16, "llama"), torch.float32)
    cos, sin, kc = args["cos_cache"], args["sin_cache"], args["k_cache"]
    _rejects("power of two", cos_cache=cos[:, :12].contiguous(), sin_cache=sin[:, :12].contiguous())
    _rejects("head_dim 24 must be a power of two", head_dim=24)
    _rejects("both cos_cache and sin_cache", sin_cache=None)
    _rejects("caches must be contiguous", k_cache=kc.transpose(0, 1).contiguous().transpose(0, 1))
    _rejects(r"pass q_weight.to\(torch.float32\)", q_weight=args["q_weight"].half())
    _rejects("must share a dtype", v_cache=args["v_cache"].half())
    _rejects("do not match", num_kv_heads=1, num_heads=6)
    _rejects("qkv rows must be contiguous", qkv=args["qkv"].t().contiguous().t())
    q_out = torch.empty(args["qkv"].shape[0], 4, 32, dtype=torch.float16, device=DEVICE)
    _rejects("q_out dtype", q_out=q_out)


PROBE = """
import json, sys
from tokenmill.kernels.qk_norm_rope import _qk_norm_rope_write_kv_kernel as fn
print(json.dumps({p.name: [p.do_not_specialize, getattr(p, "do_not_specialize_on_alignment",
                  None)] for p in fn.params}))
"""


def test_index_pointers_do_not_specialize_but_data_pointers_do():
    # kernel flags exist only on compiled kernels: probe in a process without the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    flags = json.loads(done.stdout)
    for name in ("positions_ptr", "slot_mapping_ptr"):
        assert flags[name][1] in (True, None), name  # None: Triton < 3.2
    for name in ("qkv_ptr", "k_cache_ptr", "q_out_ptr", "stride_qkv_token"):
        assert not flags[name][0] and flags[name][1] in (False, None), name
