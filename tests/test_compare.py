"""`batchdeck compare`: the summaries of several reports side by side, and per phase."""
from __future__ import annotations

import json

import pytest

from batchdeck.cli import main
from batchdeck.engine.config import LiveConfig
from batchdeck.presets.compare import change_cell, compare_text
from batchdeck.presets.report import build_report
from tests.test_replay import _change, _it, _req


def _report(name: str, step: float, n_changes: int) -> dict:
    iterations = [_it(i, step * (i + 1)) for i in range(10)]
    requests = [_req(f"r{i}", step * i) for i in range(5)]
    events = [_change(5, step * 5, chunk_size=32)][:n_changes]
    return build_report(preset={"name": name}, iterations=iterations, requests=requests, events=events,
                        initial_config=LiveConfig().to_dict(), run={"speed": 1.0, "duration_scale": 0.5})


@pytest.fixture
def reports(tmp_path):
    a, b = tmp_path / "static.json", tmp_path / "continuous.json"
    a.write_text(json.dumps(_report("static-vs-continuous", 0.2, 1)))
    b.write_text(json.dumps(_report("static-vs-continuous", 0.1, 1)))
    return a, b


def _row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(label))


def test_compare_prints_both_runs(reports, capsys):
    a, b = reports
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[3]
    assert "static" in header and "continuous" in header and "change" in header
    assert f"{a}: preset static-vs-continuous (duration_scale=0.5)" in out
    row = _row(out, "generation throughput (tok/s)").split()
    # b ran the same 20 generated tokens in half the time: twice the throughput, marked better
    assert row[-4:] == ["10.0", "20.0", "x2.00", "(better)"]
    assert "(worse)" not in _row(out, "TTFT p99")
    assert "SLO met: interactive" in out and "service tokens: t" in out


def test_compare_phases(reports, capsys):
    a, b = reports
    assert main(["compare", "--phases", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[3]
    for col in ("static[0]", "static[1] chunk_size=32", "continuous[0]", "continuous[1] chunk_size=32"):
        assert col in header
    assert "change" not in header  # four columns: no pairwise change
    assert len(_row(out, "iterations").split()) == 1 + 4


def test_compare_three_and_errors(reports, tmp_path, capsys):
    a, b = reports
    text = compare_text([a, b, a])
    assert "change" not in text.splitlines()[4]
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a report"}')
    assert main(["compare", str(a), str(bad)]) == 2
    assert "not a batchdeck replay report" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert change_cell("TTFT p99", 2.0, 1.0) == "x0.50 (better)"
    bad.write_text('{"summary": null}')
    assert main(["compare", str(a), str(bad)]) == 2
    assert "not a batchdeck replay report" in capsys.readouterr().err


def test_reports_of_the_same_name_are_told_apart_by_their_folders(reports, tmp_path, capsys):
    a, _ = reports
    for folder in ("run1", "run2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "r.json").write_text(a.read_text())
    assert main(["compare", str(tmp_path / "run1" / "r.json"), str(tmp_path / "run2" / "r.json")]) == 0
    header = capsys.readouterr().out.splitlines()[3]
    assert "run1/r" in header and "run2/r" in header, header
    assert change_cell("SLO met: realtime", 0.5, 0.75) == "+25.0 pt (better)"


def test_speculation_rows_appear_only_when_a_column_speculated():
    from batchdeck.presets.compare import metric_rows

    off = {"speculation": {"proposed": 0, "accepted": 0, "acceptance_rate": None, "tokens_per_iteration": 6.0}}
    on = {"speculation": {"proposed": 40, "accepted": 30, "acceptance_rate": 0.75, "tokens_per_iteration": 9.5}}
    labels = [label for label, _, _ in metric_rows([off, off])]
    assert "draft acceptance" not in labels and "drafted tokens (speculation)" not in labels
    assert "generated tokens / iteration" in labels
    rows = {label: cells for label, _, cells in metric_rows([off, on])}
    assert rows["draft acceptance"] == ["-", "75.0%"]
    assert rows["drafted tokens (speculation)"] == ["0", "40"]
    assert rows["generated tokens / iteration"] == ["6.00", "9.50"]
