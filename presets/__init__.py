"""Workload presets: a scripted workload plus a timeline of live config changes (see `schema`)."""
from __future__ import annotations

from pathlib import Path

from batchdeck.presets.schema import (
    BurstSpec,
    ClosedLoopSpec,
    GammaSpec,
    LengthDist,
    PoissonSpec,
    Preset,
    PresetError,
    StreamSpec,
    TimelineEntry,
    TraceSpec,
    load_preset,
    parse_preset,
)

PRESETS_DIR = Path(__file__).resolve().parent


def shipped_presets(directory: str | Path = PRESETS_DIR) -> dict[str, Path]:
    """The preset files shipped in the package, by name (the file's stem), sorted."""
    return {p.stem: p for p in sorted(Path(directory).glob("*.yaml"))}


def resolve_preset(name_or_path: str | Path) -> Path:
    """The file for a shipped preset's name (`quickstart`, `quickstart.yaml`) or an existing path."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    shipped = shipped_presets()
    stem = candidate.name[:-5] if candidate.name.endswith(".yaml") else candidate.name
    if candidate.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise PresetError(
        str(name_or_path), "", None, "no such preset file or shipped preset; shipped: " + ", ".join(shipped)
    )


__all__ = [
    "BurstSpec",
    "ClosedLoopSpec",
    "GammaSpec",
    "LengthDist",
    "PRESETS_DIR",
    "PoissonSpec",
    "Preset",
    "PresetError",
    "StreamSpec",
    "TimelineEntry",
    "TraceSpec",
    "load_preset",
    "parse_preset",
    "resolve_preset",
    "shipped_presets",
]
