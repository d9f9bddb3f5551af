import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_helpers import make_llm, running_server  # noqa: E402


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    """One real server (API key set) shared by the server tests."""
    with running_server(tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir):
    """A second engine over the same checkpoint, to compare the server with LLM.generate."""
    return make_llm(tiny_model_dir)
