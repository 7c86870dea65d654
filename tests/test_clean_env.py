"""benchmarks/clean_env.py: the environment it builds holds batchdeck's dependency closure and nothing
beside it (what start-up is measured in on a machine with more packages than a clean install)."""
from __future__ import annotations

import os
import subprocess

import pytest
from packaging.utils import canonicalize_name

from benchmarks.clean_env import build, closure, compile_bytecode


def test_closure_follows_requirements_and_leaves_out_dev_extras():
    dists, _missing = closure("batchdeck")
    names = {canonicalize_name(d.metadata["Name"]) for d in dists}
    assert {"batchdeck", "torch", "transformers", "pyyaml", "textual"} <= names
    assert "huggingface-hub" in names  # through transformers, not named by batchdeck
    assert "pytest" not in names and "hypothesis" not in names  # the dev extra is not followed


def test_built_environment_imports_the_closure_only(tmp_path):
    made = build(str(tmp_path / "env"), compile=False)
    assert made["compile_seconds"] is None
    probe = ("import importlib.util as u, batchdeck.engine.settings;"
             "print(u.find_spec('torch') is not None, u.find_spec('transformers') is not None,"
             " u.find_spec('pytest') is None, batchdeck.engine.settings.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([made["python"], "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=env).stdout.split()
    assert out[:3] == ["True", "True", "True"]
    # away from the repository and with no PYTHONPATH: only the editable install's finder maps this
    assert out[3].endswith("engine/settings.py")
    assert made["not_installed"] == [] and made["clashes"] == [] and made["no_files"] == []


def test_refuses_an_existing_path(tmp_path):
    with pytest.raises(SystemExit, match="exists"):
        build(str(tmp_path))


def test_compile_bytecode_writes_what_an_import_reads(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "mod.py").write_text("Y = 2\n")
    (tmp_path / "single.py").write_text("Z = 3\n")
    _seconds, failed = compile_bytecode([str(pkg), str(tmp_path / "single.py")])
    assert failed == []
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pyc"))
    assert [w.split(".")[0] for w in written] == ["__pycache__/single", "pkg/__pycache__/__init__",
                                                  "pkg/sub/__pycache__/mod"]


def test_compile_bytecode_reports_what_it_could_not_compile(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.py").write_text("def (:\n")
    _seconds, failed = compile_bytecode([str(bad)])
    assert failed == [str(bad)]


def test_refuses_a_root_that_is_not_installed(tmp_path):
    with pytest.raises(SystemExit, match="no-such-dist is not installed"):
        build(str(tmp_path / "env"), root="no-such-dist", compile=False)
    assert not (tmp_path / "env").exists()
