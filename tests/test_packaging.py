"""The package installs under one top-level name, `batchdeck`, and lists every folder of its rooms."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = {"batchdeck": "batchdeck", "batchdeck.engine": "engine", "batchdeck.policies": "policies",
         "batchdeck.presets": "presets", "batchdeck.console": "console"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_and_mapped():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == ROOMS
    found = set()
    for name, folder in ROOMS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(setuptools["packages"])


def test_license_uses_the_pep639_form():
    assert isinstance(_pyproject()["project"]["license"], str)


@pytest.mark.slow
def test_plain_install_puts_only_batchdeck_at_the_top(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, cwd=tmp_path, timeout=600)
    top = {p.name for p in target.iterdir()
           if not p.name.endswith((".dist-info", ".egg-info")) and p.name not in ("bin", "__pycache__")}
    assert top == {"batchdeck"}
    installed = target / "batchdeck"
    assert (installed / "console" / "console.tcss").is_file()
    assert (installed / "presets" / "quickstart.yaml").is_file()
    assert (installed / "presets" / "traces" / "azure_conv.csv").is_file()
    out = subprocess.run([sys.executable, "-m", "batchdeck", "--version"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("batchdeck "), out.stderr


def test_python_m_batchdeck_help():
    out = subprocess.run([sys.executable, "-m", "batchdeck", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout and "console" in out.stdout
