"""Importing the library must stay light: no server or dataset stacks (they load lazily)."""

import subprocess
import sys


def test_import_does_not_pull_server_or_dataset_packages():
    code = (
        "import sys, tokenmill, tokenmill.engine, tokenmill.engine.llm, tokenmill.cli.app\n"
        "from tokenmill import LLM, SamplingParams\n"
        "heavy = [m for m in ('fastapi', 'uvicorn', 'datasets', 'pyarrow') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout.strip()}"


def test_cli_help_does_not_import_torch():
    code = "import sys, tokenmill.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
