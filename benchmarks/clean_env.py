"""A virtual environment holding only batchdeck's dependency closure, linked from this interpreter's.

    python3 benchmarks/clean_env.py /tmp/clean          # prints the new interpreter's path
    cd /tmp && env -u PYTHONPATH /tmp/clean/bin/python <repo>/benchmarks/gpu_startup.py --repeats 1 --out ...

(run from outside the repository, whose `batchdeck/` folder would shadow the installed package)

A shared machine's Python often holds many more packages than `make install` puts in `.venv`, and
transformers imports some of them when they are present (scikit-learn, scipy, pandas, pyarrow,
accelerate), which a user's start-up never pays. Nothing is downloaded: the closure's distributions
(batchdeck's own requirements, no extras, followed through their requirements and markers) are
symlinked, top-level entry by entry, into the new environment's site-packages, so `.pth` files
(an editable batchdeck's finder among them) keep working. A requirement that is not installed here
(no RECORD) is listed and skipped; a top-level folder several distributions share (`nvidia/`) is
linked whole, and one split between two site directories keeps the first (both are listed).
The linked modules' missing bytecode is written, as pip's install does (`--no-compile` to skip):
an environment installed without it, or run under PYTHONDONTWRITEBYTECODE, compiles every module
it imports at every start. It is written through the links, into the source environment's packages.
"""
from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def installed(name: str) -> metadata.Distribution | None:
    """The installed distribution of that name: the first with a RECORD (the list of files an install
    wrote), never a source tree's `*.egg-info` that the current directory on sys.path may show first."""
    return next((d for d in metadata.distributions(name=name) if d.read_text("RECORD") is not None), None)


def closure(root: str) -> tuple[list[metadata.Distribution], list[str]]:
    """The installed distributions `root` needs (itself included), and the requirements not installed."""
    env = default_environment()
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        dist = installed(name)
        if dist is None:
            missing.append(name)
            continue
        found.setdefault(key[0], dist)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = any(req.marker is None or req.marker.evaluate(dict(env, extra=e)) for e in extras | {""})
            if wanted:
                todo.append((req.name, frozenset(req.extras)))
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"])), sorted(set(missing))


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """Absolute paths of the files and folders a distribution puts directly in its site directory."""
    base = os.path.realpath(str(dist.locate_file("")))
    entries = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or os.path.isabs(str(f)):
            continue
        entries.add(os.path.join(base, parts[0]))
    return {e for e in entries if os.path.exists(e)}


def compile_bytecode(paths: list[str]) -> tuple[float, list[str]]:
    """Write the bytecode of every module under `paths`, as pip's install does (beside the sources;
    up-to-date files are kept). Returns the seconds it took and the paths where some file failed
    (a read-only folder, a source that does not compile)."""
    t0 = time.perf_counter()
    workers = os.cpu_count() or 1
    failed = []
    for path in paths:
        if os.path.isdir(path):
            ok = compileall.compile_dir(path, quiet=2, workers=workers)
        elif path.endswith(".py"):
            ok = compileall.compile_file(path, quiet=2)
        else:
            continue
        if not ok:
            failed.append(path)
    return time.perf_counter() - t0, failed


def build(dest: str, root: str = "batchdeck", compile: bool = True) -> dict:
    """Create the environment at `dest` (which must not exist); return what it holds. With `compile`,
    the linked modules get their bytecode, which an environment installed with pip's --no-compile (or
    used under PYTHONDONTWRITEBYTECODE) lacks, so every start would compile them again. The links lead
    to the running interpreter's packages, so that bytecode lands in their own __pycache__ folders:
    the source environment has it too from then on."""
    if os.path.exists(dest):
        raise SystemExit(f"{dest} exists: give a new path")
    dists, missing = closure(root)
    if root in missing:
        raise SystemExit(f"{root} is not installed in {sys.executable}: install it there first (pip install -e .)")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True)
    python = os.path.join(dest, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    linked: list[str] = []
    no_files: list[str] = []  # installed, but their RECORD names no file
    clashes: list[str] = []  # one name in two places (a namespace folder split between site directories)
    for dist in dists:
        entries = top_level_entries(dist)
        if not entries:
            no_files.append(dist.metadata["Name"])
        for entry in sorted(entries):
            link = os.path.join(site, os.path.basename(entry))
            if not os.path.lexists(link):
                os.symlink(entry, link)
                linked.append(os.path.basename(entry))
            elif os.path.realpath(link) != entry:
                clashes.append(f"{entry} (kept {os.path.realpath(link)})")
    compile_s, failed = compile_bytecode([os.path.join(site, name) for name in linked]) if compile else (None, [])
    return {"python": python, "distributions": [d.metadata["Name"] for d in dists],
            "not_installed": missing, "no_files": no_files, "clashes": clashes, "linked": len(linked),
            "compile_seconds": compile_s, "compile_failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", help="where to create the environment (a new path)")
    ap.add_argument("--root", default="batchdeck", help="the distribution whose closure is linked")
    ap.add_argument("--no-compile", action="store_true", help="leave missing bytecode missing")
    args = ap.parse_args()
    made = build(args.dest, args.root, compile=not args.no_compile)
    print(f"{len(made['distributions'])} distributions, {made['linked']} entries linked"
          + (f", bytecode written in {made['compile_seconds']:.1f} s" if made["compile_seconds"] is not None else ""),
          file=sys.stderr)
    for key, what in (("not_installed", "not installed here (skipped)"), ("no_files", "installed with no files listed"),
                      ("clashes", "not linked, the name was taken"), ("compile_failed", "bytecode not all written")):
        if made[key]:
            print(f"{what}: " + ", ".join(made[key]), file=sys.stderr)
    print(made["python"])


if __name__ == "__main__":
    main()
