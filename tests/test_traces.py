"""Trace loading: the shipped Azure files, scaling, windows, JSONL, and error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchdeck.presets.trace_loader import TraceError, load_trace, parse_datetime, trace_columns
from batchdeck.presets.workload_streams import generate_open_loop
from batchdeck.presets import PRESETS_DIR, TraceSpec

TRACES = PRESETS_DIR / "traces"
AZURE = {"time": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}


def test_parse_azure_datetime_keeps_seven_digits():
    a = parse_datetime("2023-11-16 18:15:46.6805900")
    b = parse_datetime("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert parse_datetime("2023-11-16T18:15:47Z") - a == pytest.approx(0.31941, abs=1e-6)
    assert parse_datetime("2023-11-16 19:15:46.6805900+01:00") == pytest.approx(a, abs=1e-6)
    with pytest.raises(ValueError):
        parse_datetime("16/11/2023 18:15")


@pytest.mark.parametrize("name", ["azure_code.csv", "azure_conv.csv"])
def test_shipped_azure_trace_reads(name):
    rows = load_trace(TRACES / name, AZURE, time_unit="datetime", limit=100)
    assert len(rows) == 100 and rows[0][0] == 0.0
    assert all(b[0] >= a[0] for a, b in zip(rows, rows[1:]))
    assert all(n_in >= 1 and n_out >= 1 for _, n_in, n_out in rows)


def test_conv_trace_first_rows():
    rows = load_trace(TRACES / "azure_conv.csv", AZURE, time_unit="datetime", limit=2)
    # 2023-11-16 18:15:46.6805900,374,44 and 2023-11-16 18:15:50.9951690,396,109
    assert rows[0] == (0.0, 374, 44)
    assert rows[1][0] == pytest.approx(4.314579, abs=1e-6) and rows[1][1:] == (396, 109)


def test_time_scale_halves_gaps():
    full = load_trace(TRACES / "azure_conv.csv", AZURE, time_unit="datetime", limit=50)
    half = load_trace(TRACES / "azure_conv.csv", AZURE, time_unit="datetime", limit=50, time_scale=0.5)
    assert [r[1:] for r in full] == [r[1:] for r in half]
    for (t_full, *_), (t_half, *_) in zip(full, half):
        assert t_half == pytest.approx(t_full / 2, abs=1e-9)


def test_length_scale_rounds_and_keeps_one_token():
    full = load_trace(TRACES / "azure_code.csv", AZURE, time_unit="datetime", limit=30)
    tiny = load_trace(TRACES / "azure_code.csv", AZURE, time_unit="datetime", limit=30, length_scale=0.001)
    small = load_trace(TRACES / "azure_code.csv", AZURE, time_unit="datetime", limit=30, length_scale=0.5)
    assert all(n_in == 1 or n_in == round(f_in * 0.001) for (_, n_in, _), (_, f_in, _) in zip(tiny, full))
    assert all(n_out == 1 for _, _, n_out in tiny)
    assert [max(1, round(r[1] * 0.5)) for r in full] == [r[1] for r in small]


def test_limit_and_start():
    everything = load_trace(TRACES / "azure_conv.csv", AZURE, time_unit="datetime", limit=400)
    window = load_trace(TRACES / "azure_conv.csv", AZURE, time_unit="datetime", start=30, limit=10)
    assert len(window) == 10 and window[0][0] == 0.0
    skipped = [r for r in everything if r[0] < 30]
    kept = everything[len(skipped):len(skipped) + 10]
    assert [r[1:] for r in window] == [r[1:] for r in kept]
    offset = kept[0][0]
    assert [r[0] for r in window] == pytest.approx([r[0] - offset for r in kept])


def test_jsonl_with_mapped_columns_in_ms(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [{"ts_ms": 1000, "prompt": 10, "completion": 3}, {"ts_ms": 1500, "prompt": 20, "completion": 4},
               {"ts_ms": 1250, "prompt": 30, "completion": 5}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    cols = {"time": "ts_ms", "input": "prompt", "output": "completion"}
    assert trace_columns(path) == ["ts_ms", "prompt", "completion"]
    assert load_trace(path, cols, time_unit="ms") == [(0.0, 10, 3), (0.25, 30, 5), (0.5, 20, 4)]


def test_missing_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"t": 0, "i": 1, "o": 2}\n{"t": 1, "o": 2}\n')
    with pytest.raises(TraceError) as info:
        load_trace(path, {"time": "t", "input": "i", "output": "o"})
    message = str(info.value)
    assert "t.jsonl" in message and "line 2" in message and "'i'" in message


def test_unparseable_value_names_file_line_and_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("when,in,out\n2023-11-16 18:15:46.1,5,6\nyesterday,5,6\n")
    with pytest.raises(TraceError) as info:
        load_trace(path, {"time": "when", "input": "in", "output": "out"}, time_unit="datetime")
    message = str(info.value)
    assert "t.csv" in message and "line 3" in message and "column 'when'" in message and "'yesterday'" in message
    path.write_text("when,in,out\n0,5,6\n1,many,6\n")
    with pytest.raises(TraceError, match=r"t\.csv: line 3, column 'in': cannot parse 'many'"):
        load_trace(path, {"time": "when", "input": "in", "output": "out"})


def test_trace_stream_through_workload():
    spec = TraceSpec(path=TRACES / "azure_code.csv", columns=AZURE, time_unit="datetime", limit=20,
                     length_scale=0.5, tenant="coder")
    items = generate_open_loop([spec], 0, 4096)
    rows = load_trace(TRACES / "azure_code.csv", AZURE, time_unit="datetime", limit=20, length_scale=0.5)
    assert len(items) == 20 and all(i.tenant == "coder" for i in items)
    assert sorted((i.arrival, i.num_prompt_tokens, i.max_tokens) for i in items) == sorted(rows)


def test_unknown_extension(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("a,b,c\n")
    with pytest.raises(TraceError, match="csv or .jsonl"):
        load_trace(path, {"time": "a", "input": "b", "output": "c"})


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Spreadsheets save CSV with a UTF-8 BOM; editors sometimes JSONL too."""
    csv_path, jsonl_path = tmp_path / "bom.csv", tmp_path / "bom.jsonl"
    csv_path.write_bytes(b"\xef\xbb\xbftimestamp,in,out\n0,5,6\n1,7,8\n")
    jsonl_path.write_bytes(b'\xef\xbb\xbf{"t": 0, "i": 5, "o": 6}\n')
    assert trace_columns(csv_path) == ["timestamp", "in", "out"]
    assert load_trace(csv_path, {"time": "timestamp", "input": "in", "output": "out"}) == [(0.0, 5, 6), (1.0, 7, 8)]
    assert load_trace(jsonl_path, {"time": "t", "input": "i", "output": "o"}) == [(0.0, 5, 6)]


def test_a_bad_hash_ids_cell_is_shown_as_written(tmp_path):
    from batchdeck.presets.prefix_workloads import load_trace_hash_ids

    path = tmp_path / "h.jsonl"
    path.write_text('{"t": 0, "h": [1, 2]}\n{"t": 1, "h": "x"}\n')
    with pytest.raises(TraceError, match=r"h\.jsonl: line 2, column 'h': cannot parse 'x' as a list"):
        load_trace_hash_ids(path, "t", "h")


def test_a_trace_file_is_parsed_once_per_version(tmp_path, monkeypatch):
    """A replay reads its traces for the early check, for scaling and for its workload: one parse, until
    the file changes."""
    import batchdeck.presets.trace_loader as trace_loader

    path = tmp_path / "t.csv"
    path.write_text("t,i,o\n0,5,2\n1,6,2\n")
    parses, real_rows = [], trace_loader._rows

    def counting_rows(p):
        parses.append(p)
        return real_rows(p)

    monkeypatch.setattr(trace_loader, "_rows", counting_rows)
    cols = {"time": "t", "input": "i", "output": "o"}
    assert trace_loader.load_trace(path, cols) == [(0.0, 5, 2), (1.0, 6, 2)]
    assert trace_loader.load_trace(path, cols, start=0.5, limit=1, length_scale=2.0) == [(0.0, 12, 4)]
    assert len(parses) == 1
    path.write_text("t,i,o\n0,5,2\n1,6,2\n2,7,2\n")  # edited: parsed again
    assert len(trace_loader.load_trace(path, cols)) == 3 and len(parses) == 2
    path.unlink()
    with pytest.raises(trace_loader.TraceError, match="cannot open trace file"):
        trace_loader.load_trace(path, cols)
