"""A simulation profile: what one calibration measured (device, model shape, KV pool, cost model, the
fit's error), as JSON. Shipped profiles live in engine/sim/profiles/NAME.json; `load_profile` takes a
shipped name (`h200-qwen3-0.6b`) or a path."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchdeck.engine.sim.cost_model import CostModel

PROFILE_FORMAT = "batchdeck-sim-profile/1"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass
class SimProfile:
    name: str
    model: str  # the --model it was calibrated with
    device_name: str  # e.g. "NVIDIA H200"
    dtype: str
    block_size: int
    num_blocks: int  # the KV pool the engine allocated on that device (gpu_memory_fraction below)
    kv_bytes_per_block: int
    model_shape: dict[str, Any]  # num_layers, hidden_size, num_kv_heads, head_dim, vocab_size, max_model_len, eos_token_ids
    cost: CostModel
    fit: dict[str, Any] = field(default_factory=dict)  # held-out error, number of shapes, ...
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    gpu_memory_fraction: float = 0.85
    spec_acceptance: float = 0.0  # chance a drafted token that is not the stand-in token is accepted anyway
    path: str | None = None  # where it was loaded from

    @property
    def vocab_size(self) -> int:
        return int(self.model_shape["vocab_size"])

    @property
    def max_model_len(self) -> int:
        return int(self.model_shape["max_model_len"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self.model_shape.get("eos_token_ids", ()))

    def label(self) -> str:
        """`simulated NVIDIA H200 (profile h200-qwen3-0.6b)` — what screens and reports show."""
        return f"simulated {self.device_name} (profile {self.name})"

    def summary(self) -> dict[str, Any]:
        """What records and reports carry about the simulation."""
        return {"simulated": True, "profile": self.name, "path": self.path, "device_name": self.device_name,
                "model": self.model, "dtype": self.dtype, "cost_model": self.cost.to_dict(), "fit": self.fit}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cost"] = self.cost.to_dict()
        d.pop("path")
        return {"format": PROFILE_FORMAT, **d}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


REQUIRED = {"name": str, "model": str, "device_name": str, "dtype": str, "block_size": int, "num_blocks": int,
            "kv_bytes_per_block": int, "model_shape": dict, "cost": dict}
SHAPE_KEYS = ("vocab_size", "max_model_len")


def profile_from_dict(d: Any, source: str = "profile") -> SimProfile:
    """Check and build; a ValueError names the file and the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a profile is a JSON object")
    if d.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{source}: format is {d.get('format')!r}, expected {PROFILE_FORMAT!r}")
    for key, kind in REQUIRED.items():
        if key not in d:
            raise ValueError(f"{source}: missing {key!r}")
        if not isinstance(d[key], kind) or isinstance(d[key], bool):
            raise ValueError(f"{source}: {key} must be a {kind.__name__}, got {d[key]!r}")
    for key in ("block_size", "num_blocks", "kv_bytes_per_block"):
        if d[key] < 1:
            raise ValueError(f"{source}: {key} must be >= 1, got {d[key]}")
    for key in SHAPE_KEYS:
        v = d["model_shape"].get(key)
        if not isinstance(v, int) or v < 2:
            raise ValueError(f"{source}: model_shape.{key} must be an integer >= 2, got {v!r}")
    acc = d.get("spec_acceptance", 0.0)
    if not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        raise ValueError(f"{source}: spec_acceptance must be in [0, 1], got {acc!r}")
    try:
        cost = CostModel(dict(d["cost"]))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    known = {f.name for f in dataclasses.fields(SimProfile)}
    kw = {k: v for k, v in d.items() if k in known and k not in ("cost", "path")}
    return SimProfile(**{**kw, "cost": cost, "spec_acceptance": float(acc)}, path=source)


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.json"))}


def load_profile(spec: "str | Path | SimProfile") -> SimProfile:
    """A profile from a path, a shipped name, or a SimProfile (returned as is)."""
    if isinstance(spec, SimProfile):
        return spec
    path = Path(spec)
    if not path.is_file():
        shipped = shipped_profiles()
        if str(spec) not in shipped:
            names = ", ".join(shipped) or "none"
            raise ValueError(f"--sim {spec}: no such file and not a shipped profile (shipped: {names}); "
                             "make one with `batchdeck calibrate --model M --out PROFILE.json`")
        path = shipped[str(spec)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return profile_from_dict(data, str(path))
