"""benchmarks/clean_env.py: the environment it builds holds batchdeck's dependency closure and nothing
beside it (what start-up is measured in on a machine with more packages than a clean install)."""
from __future__ import annotations

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
    out = subprocess.run([made["python"], "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["True", "True", "True"]
    assert out[3].endswith("engine/settings.py")  # the editable install's finder works there too


def test_refuses_an_existing_path(tmp_path):
    with pytest.raises(SystemExit, match="exists"):
        build(str(tmp_path))


def test_compile_bytecode_writes_what_an_import_reads(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "mod.py").write_text("Y = 2\n")
    (tmp_path / "single.py").write_text("Z = 3\n")
    compile_bytecode([str(pkg), str(tmp_path / "single.py")])
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pyc"))
    assert [w.split(".")[0] for w in written] == ["__pycache__/single", "pkg/__pycache__/__init__",
                                                  "pkg/sub/__pycache__/mod"]
