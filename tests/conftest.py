import sys
from pathlib import Path

import pytest

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
