"""Programmatic dependent launch (Hopper and later): a kernel launched with it may be scheduled while
the kernel before it in the stream is still running, and waits (`griddepcontrol.wait`) before it
touches memory. In a decode step of ~250 small kernels the launch latency between two of them is a
sizeable share of the step; with PDL it overlaps the previous kernel's tail.

Every Triton kernel of the engine takes `USE_PDL: tl.constexpr` and starts with `pdl_prologue(USE_PDL)`:
wait for the previous kernel (all its programs done, their writes visible), then let the next one be
scheduled. Waiting before any load keeps stream order for everything a kernel reads, however many
kernels back it was written. BATCHDECK_PDL=0 turns it off (for a before/after)."""
from __future__ import annotations

import os

import torch

try:  # the launch rule below is pure; the prologue is Triton code (CUDA builds of torch ship Triton)
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: no Triton kernel runs, and none imports the prologue
    triton = None

_LAUNCH: dict[torch.device, dict[str, bool]] = {}
_ON = {"USE_PDL": True, "launch_pdl": True}


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel on `device`: PDL on (the kernel's USE_PDL and Triton's launch_pdl)
    on CUDA compute capability 9.0+ unless BATCHDECK_PDL=0; none otherwise (the kernel's default is off,
    and Triton's interpreter takes no launch_pdl)."""
    kw = _LAUNCH.get(device)
    if kw is None:
        raw = os.environ.get("BATCHDECK_PDL", "1")
        if raw not in ("0", "1"):
            raise ValueError(f"BATCHDECK_PDL={raw!r}: allowed 0 (off) or 1 (on where the GPU supports it)")
        on = raw == "1" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        kw = _LAUNCH[device] = _ON if on else {}
    return kw


if triton is not None:
    @triton.jit
    def pdl_prologue(USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
