"""The packages' layers, as contracts (pyproject.toml ``[tool.importlinter]``): no import cycles
at any depth (imports inside functions count), ``models`` never imports the service, the
service never imports training or the benchmarks, the service's layers -- process supervision,
composition, HTTP edge, pipeline, backends -- only import downwards, the HTTP edge never imports
a backend and the pipeline only the backends' protocol. A back-import added on purpose (e.g.
``from app.main import create_app`` in app/pipeline/service.py) breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout or "broken" not in done.stdout.split("Contracts:")[-1].split("\n")[0]


def test_no_module_in_app_is_over_500_lines_and_no_function_over_80():
    import ast

    long_modules, long_functions = [], []
    for path in sorted((REPO / "app").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500 and path.name != "batcher.py":  # the batcher: one focused module
            long_modules.append(str(path.relative_to(REPO)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
