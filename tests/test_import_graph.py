"""The rooms' arrows point down only, checked over the installed package's source (ast, no imports run).

Rooms: the core (`batchdeck.engine` less `batchdeck.engine.service`), the service
(`batchdeck.engine.service`), `batchdeck.policies`, `batchdeck.presets`, `batchdeck.console` and the
command line (`batchdeck.cli`, `batchdeck.__main__`; the package root holds only `__version__`). Every `import` counts,
including those under `if TYPE_CHECKING:` and inside functions. `__import__`/`import_module` may
load only an optional third-party module named in ALLOWED_DYNAMIC, never a batchdeck module.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

ROOTS = ("batchdeck", "batchdeck.engine", "batchdeck.policies", "batchdeck.presets", "batchdeck.console")
# room -> the rooms it must not import
FORBIDDEN = {
    "core": {"service", "cli", "console", "presets"},
    "service": {"cli", "console", "presets"},
    "policies": {"service", "cli", "console", "presets"},  # policies import only the core
    "presets": {"cli", "console"},
    "console": {"cli"},
    "cli": set(),
}
ALLOWED_DYNAMIC = {("batchdeck.engine.service.gpu_monitor", "pynvml")}  # NVML bindings are optional


def room_of(module: str) -> str | None:
    """The room a batchdeck module belongs to (None for third-party modules)."""
    if module == "batchdeck.engine.service" or module.startswith("batchdeck.engine.service."):
        return "service"
    for prefix, room in (("batchdeck.engine", "core"), ("batchdeck.policies", "policies"),
                         ("batchdeck.presets", "presets"), ("batchdeck.console", "console")):
        if module == prefix or module.startswith(prefix + "."):
            return room
    if module.startswith("batchdeck."):
        return "cli"
    return None  # third-party, or the package root `batchdeck` (its version only: any room may read it)


def installed_modules() -> dict[str, Path]:
    """Every module of the installed package -> its source file (found through the import system,
    so an editable and a plain install are walked alike)."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        pkg = importlib.import_module(root)
        found[root] = Path(pkg.__file__)
        for info in pkgutil.walk_packages(pkg.__path__, root + ".", onerror=lambda name: None):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                found[info.name] = Path(spec.origin)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # `from pkg import name` may import the submodule pkg.name: count both
    return [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*" and not a.name.startswith("__")]


def imports_of(module: str, path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str | None]]]:
    """(static imports as (line, module), dynamic imports as (line, literal name or None))."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    static: list[tuple[int, str]] = []
    dynamic: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            static.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            static.extend((node.lineno, name) for name in _absolute(module, is_package, node))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else None)
            if name in ("__import__", "import_module"):
                arg = node.args[0] if node.args else None
                literal = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                dynamic.append((node.lineno, literal))
    return static, dynamic


MODULES = installed_modules()


def test_the_walk_finds_every_room():
    rooms = {room_of(m) for m in MODULES} - {None}
    assert rooms == set(FORBIDDEN)
    assert "batchdeck.engine.scheduler" in MODULES and "batchdeck.engine.service.mqtt_bridge" in MODULES
    assert len(MODULES) > 60


def violations(module: str, path: Path) -> list[str]:
    room = room_of(module) or "cli"
    static, dynamic = imports_of(module, path)
    found, lines = [], set()
    for line, target in static:
        if room_of(target) in FORBIDDEN[room] and line not in lines:  # one per statement
            lines.add(line)
            found.append(f"{path}:{line}: the {room} imports {target} ({room_of(target)})")
    for line, name in dynamic:
        if (module, name) not in ALLOWED_DYNAMIC:
            found.append(f"{path}:{line}: dynamic import of {name or 'a computed name'} "
                         "(import it statically, or through the command line's wiring)")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_point_down(module):
    assert violations(module, MODULES[module]) == []


def test_the_checker_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from batchdeck.engine.service.bus import Bus\n"
                   "def f():\n    from ..console import app\n    import importlib\n"
                   "    importlib.import_module('batchdeck.presets')\n    __import__(name)\n")
    found = violations("batchdeck.engine.scheduler", bad)
    assert len(found) == 4, found
    assert "imports batchdeck.engine.service.bus (service)" in found[0]
    assert "imports batchdeck.console" in found[1]
    assert "dynamic import of batchdeck.presets" in found[2] and "a computed name" in found[3]
    assert violations("batchdeck.policies.fcfs", bad)  # policies: the core only
    ok = tmp_path / "ok.py"
    ok.write_text("from batchdeck.engine.request import Request\nfrom batchdeck.policies import make_policy\n"
                  "from batchdeck import __version__\n")
    assert violations("batchdeck.engine.service.bus", ok) == []
    assert violations("batchdeck.policies.fcfs", ok) == []
    cli = tmp_path / "cli.py"
    cli.write_text("from batchdeck import cli\n")
    assert violations("batchdeck.engine.service.bus", cli)  # the package root's submodule is the CLI
