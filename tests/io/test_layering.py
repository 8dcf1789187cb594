"""`jquant.io` never imports `jquant.models`: models loads through io, so the dependency goes
one way (a lazy import inside a function counts too: it only hides a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jquant.io

IO_DIR = Path(jquant.io.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, relative imports made absolute."""
    package = "jquant.io"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_io_never_imports_models():
    modules = sorted(IO_DIR.rglob("*.py"))
    assert len(modules) >= 5
    offenders = {
        p.name: sorted(m for m in _imports(p) if m == "jquant.models" or
                       m.startswith("jquant.models."))
        for p in modules
    }  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("source", [
    "def f():\n    from jquant.models.llama import Llama\n",
    "from .. import models\n",
    "import jquant.models as jm\n",
])  # fmt: skip
def test_the_import_parser_sees_lazy_and_relative_imports(tmp_path, source):
    src = tmp_path / "m.py"
    src.write_text(source)
    assert any(m.startswith("jquant.models") for m in _imports(src))
