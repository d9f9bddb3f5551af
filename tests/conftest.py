import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels can only run in the interpreter, and TRITON_INTERPRET must be
# set before triton compiles anything: building a transformers config imports triton, so a test
# module doing that at collection time would otherwise fix compiled mode for the whole run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from factories import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint (GQA, untied), shared by the whole session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Make (and cache) a tiny checkpoint of any arch in factories.ARCHS."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = arch + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **kw)
        return cache[key]

    return make
