"""Imports point one way (DESIGN.md): serving -> engine -> samplers, engine -> checkpoints.

Each module is imported alone in a fresh interpreter and the project packages it pulled in
are listed, so a new import against the direction fails here.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_LIST = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2:])))
"""


def imported(module: str, *packages: str) -> set[str]:
    """The modules of `packages` that importing `module` loads."""
    out = subprocess.run(
        [sys.executable, "-c", _LIST, module, *packages],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("checkpoints", ("engine", "serving", "samplers")),
        ("samplers", ("engine", "serving", "checkpoints")),
        ("engine.cpu_kernels", ("checkpoints", "serving", "samplers")),
    ],
)
def test_no_import_against_the_direction(module, forbidden):
    assert imported(module, *forbidden) == set()


def test_the_shared_checkpoint_types_import_nothing_of_the_project():
    # Read, not imported: importing any checkpoints module runs the package's __init__.
    tree = ast.parse((REPO / "checkpoints" / "source.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names and not {n for n in names if n.split(".")[0] in ("checkpoints", "engine")}
