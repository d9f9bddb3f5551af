import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_helpers import BODY_LIMIT, make_llm, running_server  # noqa: E402


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    """One real server (API key set, engine core in its own process) shared by the tests."""
    from tokenmill.server.limits import ServerLimits

    with running_server(tiny_model_dir, limits=ServerLimits(max_request_bytes=BODY_LIMIT)) as s:
        yield s


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir):
    """A second engine over the same checkpoint, to compare the server with LLM.generate."""
    return make_llm(tiny_model_dir)
