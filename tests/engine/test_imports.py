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


# What each layer may import of ours (STYLE.md): cli -> io / server / bench / ray -> engine ->
# kernels. Checked on the source text, so a lazy import inside a function counts too.
_MAY_NOT_IMPORT = {
    "kernels": ("engine", "io", "server", "bench", "cli", "ray"),
    "engine": ("io", "server", "bench", "cli", "ray"),
}


def test_imports_run_one_way():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "tokenmill"
    wrong = []
    for layer, banned in _MAY_NOT_IMPORT.items():
        for path in sorted((root / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "tokenmill" and len(parts) > 1 and parts[1] in banned:
                        wrong.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_unconstrained_generation_never_loads_the_grammar_library(tiny_model_dir):
    """xgrammar (and its native runtime) loads only for a constrained request: plain batch jobs
    and machines without it (the GPU image has none) must not depend on it."""
    code = (
        "import sys\n"
        "from tokenmill import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_model_dir)!r}, device='cpu', kv_cache_memory='8MiB')\n"
        "llm.generate(['hello'], SamplingParams(max_tokens=3), use_tqdm=False)\n"
        "print('xgrammar' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
