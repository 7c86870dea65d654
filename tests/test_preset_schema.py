"""Preset schema: every kind of mistake names the file, the key path and the line; shipped presets load."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchdeck.presets import (
    LengthDist,
    PoissonSpec,
    PresetError,
    TraceSpec,
    load_preset,
    parse_preset,
    resolve_preset,
    shipped_presets,
)

GOOD = """\
name: t
description: a test preset
model: synthetic:tiny
engine: {device: cpu, dtype: float32, block_size: 16, num_blocks: 64}
config: {policy: fcfs, max_num_seqs: 4, chunk_size: 128}
workload:
  - kind: poisson
    rate: 4
    duration: 10
    input_tokens: {dist: lognormal, mean: 64, sigma: 0.5, max: 256}
    output_tokens: 8
  - kind: burst
    at: 2
    count: 3
    input_tokens: {dist: uniform, min: 4, max: 8}
    output_tokens: {dist: constant, value: 4}
timeline:
  - at: 5
    set: {chunk_size: 64}
seed: 1
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PresetError) as info:
        load_preset(path)
    return str(info.value)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_good_preset_parses(tmp_path):
    preset = load_preset(write(tmp_path, GOOD, "good.yaml"))
    assert preset.name == "t" and preset.seed == 1 and preset.model == "synthetic:tiny"
    assert preset.engine["num_blocks"] == 64
    assert preset.config == {"policy": "fcfs", "max_num_seqs": 4, "chunk_size": 128}
    first = preset.workload[0]
    assert isinstance(first, PoissonSpec) and first.rate == 4 and first.duration == 10 and first.count is None
    assert first.input_tokens == LengthDist(dist="lognormal", mean=64, sigma=0.5, max=256)
    assert first.output_tokens == 8
    assert preset.workload[1].kind == "burst" and preset.workload[1].at == 2
    assert preset.timeline[0].at == 5 and preset.timeline[0].set == {"chunk_size": 64}
    assert preset.path == tmp_path / "good.yaml"


# (description, edit as (old, new) on GOOD, expected key path, line marker in the edited text, words)
MISTAKES = [
    ("unknown top-level key", ("seed: 1", "seed: 1\nspeed: 3"), "speed", "speed:", "allowed"),
    ("unknown stream key", ("    rate: 4\n", "    rate: 4\n    rte: 3\n"), "workload[0].rte", "rte:", "allowed"),
    ("negative rate", ("rate: 4", "rate: -4"), "workload[0].rate", "rate:", "in (0, 100000]"),
    ("zero rate", ("rate: 4", "rate: 0"), "workload[0].rate", "rate:", "in (0, 100000]"),
    ("rate wrong type", ("rate: 4", "rate: fast"), "workload[0].rate", "rate:", "number"),
    ("unknown kind", ("kind: burst", "kind: bursty"), "workload[1].kind", "bursty", "closed-loop"),
    ("unknown dist", ("dist: uniform", "dist: zipf"), "workload[1].input_tokens.dist", "zipf", "lognormal"),
    ("unknown dist key", ("sigma: 0.5,", "sigma: 0.5, std: 2,"), "workload[0].input_tokens.std", "std", "allowed"),
    ("dist min > max", ("min: 4, max: 8", "min: 9, max: 8"), "workload[1].input_tokens.max", "min: 9", "min"),
    ("missing required key", ("    rate: 4\n", ""), "workload[0]", "kind: poisson", "'rate'"),
    ("both duration and count", ("duration: 10", "duration: 10\n    count: 3"), "workload[0].count",
     "count: 3", "exactly one"),
    ("neither duration nor count", ("    duration: 10\n", ""), "workload[0]", "kind: poisson", "exactly one"),
    ("unknown slo_class", ("    output_tokens: 8\n", "    output_tokens: 8\n    slo_class: gold\n"),
     "workload[0].slo_class", "gold", "realtime"),
    ("unknown engine key", ("num_blocks: 64}", "num_blocks: 64, gpus: 2}"), "engine.gpus", "gpus", "block_size"),
    ("engine value invalid", ("dtype: float32", "dtype: float8"), "engine.dtype", "float8", "bfloat16"),
    ("unknown live key in config", ("chunk_size: 128}", "chunk_size: 128, chunk: 3}"), "config.chunk",
     "chunk: 3", "live setting"),
    ("timeline at and at_iteration", ("  - at: 5\n", "  - at: 5\n    at_iteration: 9\n"),
     "timeline[0].at_iteration", "at_iteration", "exactly one"),
    ("timeline unknown key", ("  - at: 5\n", "  - at: 5\n    when: 9\n"), "timeline[0].when", "when:", "allowed"),
    ("timeline set unknown live key", ("set: {chunk_size: 64}", "set: {chunk_sz: 64}"), "timeline[0].set.chunk_sz",
     "chunk_sz", "a live setting"),
    ("timeline set invalid value", ("set: {chunk_size: 64}", "set: {policy: lifo}"), "timeline[0].set.policy",
     "lifo", "one of fcfs, sjf, slo, fair, priority"),
    ("timeline chunk over max_batched_tokens", ("set: {chunk_size: 64}", "set: {chunk_size: 1000}"),
     "timeline[0].set.chunk_size", "chunk_size: 1000", "[1, 512] (the live max_batched_tokens)"),
    ("timeline without action", ("    set: {chunk_size: 64}\n", ""), "timeline[0]", "at: 5", "exactly one"),
    ("trace file missing",
     ("timeline:", "  - kind: trace\n    path: nowhere.csv\n    columns: {time: t, input: i, output: o}\ntimeline:"),
     "workload[2].path", "nowhere.csv", "not found"),
]


@pytest.mark.parametrize("desc, edit, key, marker, words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_names_file_key_and_line(tmp_path, desc, edit, key, marker, words):
    old, new = edit
    assert old in GOOD, desc
    text = GOOD.replace(old, new, 1)
    message = error_for(tmp_path, text)
    assert "bad.yaml" in message
    assert f": {key}:" in message
    assert f"line {line_of(text, marker)}:" in message
    assert words in message


@pytest.mark.parametrize("value", ["{}", "false", "0", "'none'"])
def test_a_timeline_that_is_not_a_list_is_refused_not_read_as_empty(tmp_path, value):
    text = GOOD.replace("timeline:\n  - at: 5\n    set: {chunk_size: 64}\n", f"timeline: {value}\n")
    assert text != GOOD
    assert "timeline: must be a list of actions" in error_for(tmp_path, text)


def test_config_error_message_is_embedded(tmp_path):
    text = GOOD.replace("set: {chunk_size: 64}", "set: {max_num_seqs: 0}")
    message = error_for(tmp_path, text)
    assert "max_num_seqs=0 is not allowed: an integer in [1, 64] (the KV pool has 64 blocks" in message


def test_timeline_sets_are_checked_cumulatively(tmp_path):
    text = GOOD.replace(
        "  - at: 5\n    set: {chunk_size: 64}\n",
        "  - at: 5\n    set: {max_batched_tokens: 2048}\n  - at: 6\n    set: {chunk_size: 2048}\n",
    )
    preset = load_preset(write(tmp_path, text, "ok.yaml"))
    assert [e.set for e in preset.timeline] == [{"max_batched_tokens": 2048}, {"chunk_size": 2048}]


def test_timeline_pause_and_resume(tmp_path):
    text = GOOD.replace("seed: 1", "  - at_iteration: 100\n    pause: 2\n  - at: 9\n    resume: true\nseed: 1")
    timeline = load_preset(write(tmp_path, text, "ok.yaml")).timeline
    assert timeline[1].at_iteration == 100 and timeline[1].at is None and timeline[1].pause == 2
    assert timeline[2].resume is True and timeline[2].set is None


def test_invalid_yaml_names_line(tmp_path):
    text = GOOD.replace("  - at: 5\n", "  - at: 5\n  bad indent: [\n")
    message = error_for(tmp_path, text)
    assert "bad.yaml, line " in message and "invalid YAML" in message


def test_top_level_must_be_mapping(tmp_path):
    message = error_for(tmp_path, "- just\n- a list\n")
    assert "bad.yaml, line 1" in message and "mapping" in message


def test_trace_column_missing_from_file(tmp_path):
    (tmp_path / "t.csv").write_text("ts,in,out\n0,1,2\n")
    text = GOOD.replace(
        "timeline:", "  - kind: trace\n    path: t.csv\n    columns: {time: ts, input: inp, output: out}\ntimeline:"
    )
    message = error_for(tmp_path, text)
    assert "workload[2].columns.input" in message and "'inp'" in message and "ts, in, out" in message


def test_parse_preset_from_text_uses_source_name(tmp_path):
    with pytest.raises(PresetError) as info:
        parse_preset(GOOD.replace("rate: 4", "rate: -1"), "inline.yaml", base_dir=tmp_path)
    assert str(info.value).startswith("inline.yaml, line 8: workload[0].rate:")


def test_every_shipped_preset_loads():
    shipped = shipped_presets()
    expected = {
        "quickstart", "static-vs-continuous", "chunked-prefill", "fcfs-vs-sjf", "slo-overload",
        "fair-noisy-tenant", "azure-conversation",
    }
    assert expected <= set(shipped)
    for name, path in shipped.items():
        preset = load_preset(path)
        assert preset.name == name
        assert preset.model == "synthetic:tiny" and preset.engine["device"] == "cpu"
        assert preset.description.strip()
        for spec in preset.workload:
            if isinstance(spec, TraceSpec):
                assert spec.path.is_file()


def test_resolve_preset():
    shipped = shipped_presets()
    assert resolve_preset("quickstart") == shipped["quickstart"]
    assert resolve_preset("quickstart.yaml") == shipped["quickstart"]
    assert resolve_preset(str(shipped["fcfs-vs-sjf"])) == shipped["fcfs-vs-sjf"]
    with pytest.raises(PresetError, match="quickstart"):
        resolve_preset("no-such-preset")
