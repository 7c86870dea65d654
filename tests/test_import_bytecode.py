"""engine/import_bytecode.py: an engine start says when its heavy imports compile their sources at every
start (no bytecode files, none written), and how to write them."""
from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest

from batchdeck.engine import import_bytecode, models


def fake_module(tmp_path, name: str, *, with_bytecode: bool) -> types.ModuleType:
    """A package `name` in tmp_path/site (its __init__.py), with or without its bytecode file."""
    (tmp_path / "site" / name).mkdir(parents=True)
    src = tmp_path / "site" / name / "__init__.py"
    src.write_text("X = 1\n")
    spec = importlib.util.spec_from_file_location(name, src)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(src)
    if with_bytecode:
        import py_compile

        py_compile.compile(str(src), cfile=spec.cached)
    return module


@pytest.fixture
def two_modules(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bd_compiled", fake_module(tmp_path, "bd_compiled", with_bytecode=True))
    monkeypatch.setitem(sys.modules, "bd_source", fake_module(tmp_path, "bd_source", with_bytecode=False))
    return tmp_path


def test_names_only_the_module_without_a_bytecode_file(two_modules, monkeypatch):
    assert import_bytecode.without_bytecode(("bd_compiled", "bd_source", "not_imported")) == ["bd_source"]
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    hint = import_bytecode.bytecode_hint(("bd_compiled", "bd_source"))
    assert hint.startswith("bd_source imported from source with no bytecode files (PYTHONDONTWRITEBYTECODE is set)")
    assert hint.endswith(f"{sys.executable} -m compileall -q -j 0 {two_modules / 'site'}")
    assert import_bytecode.bytecode_hint(("bd_compiled",)) is None


@pytest.fixture
def fresh_check():
    """The once-per-process check forgotten before and after the test (later loads look again)."""
    models._warn_once_if_compiled_from_source.cache_clear()
    yield
    models._warn_once_if_compiled_from_source.cache_clear()


def test_the_engine_start_logs_it_once(two_modules, fresh_check, monkeypatch, caplog):
    monkeypatch.setattr(import_bytecode, "HEAVY_IMPORTS", ("bd_source",))
    with caplog.at_level(logging.WARNING, logger="batchdeck"):
        models.load_model("synthetic:tiny")
        models.load_model("synthetic:tiny")
    said = [r.getMessage() for r in caplog.records if "no bytecode files" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("bd_source imported from source")
