"""Every architecture builds under a non-CPU default device, with no op mixing devices.

The model runner builds models under `with torch.device(...)`. A tensor made on the CPU on
purpose (rope's inv_freq) that meets one made on the default device crashed Llama 3 rope on
the GPU; on CPU the meta device plays the GPU, and a dispatch mode fails any op whose tensor
arguments sit on two devices (meta silently absorbs CPU tensors otherwise).
"""

from __future__ import annotations

import pytest
import torch
from factories import ARCHS, make_tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tokenmill.engine.attention import TorchAttentionBackend
from tokenmill.engine.models.registry import model_class

ROPE_VARIANTS = {
    "llama3": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
    "yarn": dict(
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    ),
    "default": {},
}


class NoMixedDevices(TorchDispatchMode):
    """Fails any op whose tensor arguments (other than 0-dim CPU scalars) span two devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {
            t.device
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")
        }
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_the_guard_catches_mixed_devices():
    with pytest.raises(AssertionError, match="mixes devices"):
        with torch.device("meta"), NoMixedDevices():
            torch.outer(torch.arange(4.0), torch.ones(3, device="cpu"))


def _plain_rope(arch: str) -> bool:
    """Whether `arch` has one default rope that a variant may replace (not none, not its own
    long-rope or per-layer-type ropes). Read from ARCHS, not from a built config: building
    transformers configs at collection imports triton before tests/kernels can ask for the
    interpreter."""
    cls_name, kwargs = ARCHS[arch]
    return cls_name not in ("OPTConfig", "GPT2Config") and "rope_parameters" not in kwargs


# Each architecture as configured (long-rope, per-layer ropes included), and those with plain
# rope also with llama3 and yarn scaling.
CASES = [
    (arch, rope)
    for arch in ARCHS
    for rope in ROPE_VARIANTS
    if rope == "default" or _plain_rope(arch)
]


@pytest.mark.parametrize("arch, rope", CASES)
def test_every_architecture_builds_on_the_default_device(arch, rope):
    config = make_tiny_config(arch, **ROPE_VARIANTS[rope])
    cls = model_class(config)
    with torch.device("meta"), NoMixedDevices():
        model = cls(config, TorchAttentionBackend(), max_position=65)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors
    off = [name for name, t in tensors if t.device.type != "meta"]
    assert not off, f"left off the default device: {off}"


def test_the_model_registry_does_not_import_triton():
    """triton is an optional (GPU) dependency: the CPU path must import without it, and an
    early import would also fix kernels into compiled mode before tests can ask for the
    interpreter."""
    import subprocess
    import sys

    code = "import sys, tokenmill.engine.models.registry; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
