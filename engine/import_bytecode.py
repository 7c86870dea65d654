"""Whether the heavy imports of an engine start read bytecode or compile their sources at every start.

Packages installed without bytecode (pip's --no-compile, some container images) in an environment
that cannot write it (PYTHONDONTWRITEBYTECODE, a read-only site-packages) compile every module they
import at every start: on the H200 host measured, `batchdeck generate` reached its first result at
14.4 s instead of 6.2 s (benchmarks/results/gpu_startup_qwen3-0.6b_clean_env*.json).
"""
from __future__ import annotations

import os
import sys

HEAVY_IMPORTS = ("torch", "transformers.modeling_utils")  # what every engine start imports, then checks


def without_bytecode(names: tuple[str, ...] | None = None) -> list[str]:
    """The imported modules among `names` (default HEAVY_IMPORTS) that were compiled from source because
    no bytecode file exists."""
    missing = []
    for name in HEAVY_IMPORTS if names is None else names:
        spec = getattr(sys.modules.get(name), "__spec__", None)
        origin = getattr(spec, "origin", None) or ""
        if origin.endswith(".py") and not (spec.cached and os.path.exists(spec.cached)):
            missing.append(name)
    return missing


def bytecode_hint(names: tuple[str, ...] | None = None) -> str | None:
    """What to tell the operator when the heavy imports compile their sources at every start; None if not."""
    missing = without_bytecode(names)
    if not missing:
        return None
    # the folders holding their top-level packages: their dependencies (sympy, numpy, ...) live there too
    sites = sorted({os.path.dirname(os.path.dirname(sys.modules[n.split(".")[0]].__file__)) for n in missing})
    why = " (PYTHONDONTWRITEBYTECODE is set)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    return (f"{', '.join(missing)} imported from source with no bytecode files{why}: every start compiles "
            f"them and their dependencies again, seconds of start-up. Write the bytecode once: "
            f"{sys.executable} -m compileall -q -j 0 {' '.join(sites)}")
