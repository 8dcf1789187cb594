"""One reader of the environment: `jquant.settings` (and `kernels/_env.py` for the kernels)."""

from __future__ import annotations

import re
from pathlib import Path

import jquant
from jquant import alloc, settings
from jquant.io import registry

ROOT = Path(jquant.__file__).parent.parent


def test_a_tilde_cache_is_one_directory_for_models_and_sensitivity(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("JQUANT_CACHE", "~/x")
    assert registry.cache_dir() == tmp_path / "x"
    assert jquant.io.cache_dir() == tmp_path / "x"
    assert alloc.cache_dir() == tmp_path / "x" / "sensitivity"
    monkeypatch.delenv("JQUANT_CACHE")
    assert registry.cache_dir() == tmp_path / ".cache" / "jquant"
    assert alloc.cache_dir() == tmp_path / ".cache" / "jquant" / "sensitivity"


def test_matmul_path_reads_through_settings(monkeypatch):
    from jquant import _dispatch

    monkeypatch.setattr(_dispatch, "_matmul_path", None)
    monkeypatch.setenv("JQUANT_MATMUL", "xla")
    assert settings.matmul_path() == "xla" and _dispatch.matmul_path() == "xla"
    monkeypatch.setenv("JQUANT_MATMUL", "")
    assert settings.matmul_path() is None and _dispatch.matmul_path() == "auto"


_READ = re.compile(r"\bos\.environ\b|\bgetenv\b|\bputenv\b")


def test_the_environment_is_read_in_one_place_per_package():
    readers = {p.relative_to(ROOT).as_posix() for folder in ("jquant", "kernels")
               for p in (ROOT / folder).rglob("*.py") if _READ.search(p.read_text())}  # fmt: skip
    assert readers == {"jquant/settings.py", "kernels/_env.py"}


def test_every_variable_read_is_documented():
    used = set()
    for folder in ("jquant", "kernels"):
        for p in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r'"(JQUANT_[A-Z_]+)"', p.read_text()))
    table = settings.__doc__
    assert used and all(f"``{name}``" in table for name in used), used
    docs = (ROOT / "docs" / "api.md").read_text()
    assert all(f"`{name}`" in docs for name in used), used
