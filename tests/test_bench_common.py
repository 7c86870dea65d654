"""benchmarks/bench_common.py: a saved result's command reproduces the run, with the kernel-tuning
variables it had set and no other BATCHDECK_* variable (those hold secrets)."""
from __future__ import annotations

import os
import sys

from benchmarks.bench_common import command_line, tuning_env


def test_command_line_repeats_the_tuning_variables_only(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x.py", "--rows", "64", "--out", "r.json", "--splits", "1"])
    for k in [k for k in os.environ if k.startswith("BATCHDECK_")]:
        monkeypatch.delenv(k)
    assert command_line("benchmarks/x.py") == "PYTHONPATH=. python benchmarks/x.py --rows 64 --splits 1"
    monkeypatch.setenv("BATCHDECK_FUSED", "2")
    monkeypatch.setenv("BATCHDECK_ATTN_DECODE", "64,4,2")
    monkeypatch.setenv("BATCHDECK_API_KEY", "s3cret key")
    monkeypatch.setenv("BATCHDECK_MQTT_PASSWORD", "hunter2")
    assert tuning_env() == {"BATCHDECK_ATTN_DECODE": "64,4,2", "BATCHDECK_FUSED": "2"}
    assert command_line("benchmarks/x.py") == ("BATCHDECK_ATTN_DECODE=64,4,2 BATCHDECK_FUSED=2 "
                                               "PYTHONPATH=. python benchmarks/x.py --rows 64 --splits 1")


def test_importing_the_serve_benchmark_stays_light():
    """gpu_serve.py's client processes are spawned: each re-imports the script and bench_common. With
    torch and the engine behind those imports each client took seconds to start, and the span it was
    timed over (from a start the parent had fixed 5 s ahead) counted them: on the H200 it halved the
    measured HTTP throughput. Neither module may import torch, transformers or the engine."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = ("import sys; import benchmarks.gpu_serve; "
             "print(sorted(m for m in ('torch', 'transformers', 'batchdeck.engine.llm_engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_every_kernel_tuning_variable_the_engine_reads_is_recorded():
    """A result's command repeats every BATCHDECK_* tuning variable the engine's kernels read (a new
    tile override forgotten in TUNING_ENV would run unrecorded)."""
    import re
    from pathlib import Path

    from benchmarks.bench_common import TUNING_ENV

    root = Path(__file__).resolve().parent.parent / "engine"
    read = set()
    for name in ("attention/triton_backend.py", "pdl.py", "triton_fused.py"):
        read |= set(re.findall(r'"(BATCHDECK_[A-Z_]+)"', (root / name).read_text()))
    assert read and read <= set(TUNING_ENV), sorted(read - set(TUNING_ENV))
