"""Hostile presets: what a preset may ask for is bounded, YAML tricks are refused with the file and
line, and open-loop arrivals are generated lazily (a huge count allocates nothing up front)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from batchdeck.presets import PresetError, load_preset, parse_preset
from tests.test_preset_schema import GOOD, error_for, line_of


def parse_within(text: str, deadline_s: float = 60.0) -> str:
    """parse_preset in a daemon thread; the PresetError's message. A hang fails instead of stalling."""
    outcome: dict[str, BaseException] = {}

    def work():
        try:
            parse_preset(text, "p.yaml")
        except BaseException as exc:  # noqa: BLE001 - the test inspects what came out
            outcome["exc"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(deadline_s)
    assert not worker.is_alive(), f"parse_preset still running after {deadline_s} s"
    exc = outcome.get("exc")
    assert isinstance(exc, PresetError), repr(exc)
    return str(exc)


BOUNDS = [  # (edit on GOOD, key path, marker of the line named, allowed range in the message)
    (("duration: 10", "count: 1000000000000"), "workload[0].count", "count: 1000000000000", "in [1, 1000000]"),
    (("output_tokens: 8", "output_tokens: 100000000"), "workload[0].output_tokens", "output_tokens: 1",
     "in [1, 1048576]"),
    (("count: 3", "count: 5000000"), "workload[1].count", "count: 5", "in [1, 1000000]"),
    (("duration: 10", "duration: 1000000"), "workload[0].duration", "duration:", "in (0, 86400]"),
    (("rate: 4", "rate: 500000.0"), "workload[0].rate", "rate:", "in (0, 100000]"),
    (("rate: 4\n    duration: 10", "rate: 50\n    duration: 86400"), "workload[0].duration", "duration:",
     "rate x duration asks for about 4,320,000 requests; at most 1,000,000 per stream"),
    (("mean: 64", "mean: 1.0e+12"), "workload[0].input_tokens.mean", "mean:", "in (0, 1.04858e+06]"),
    (("sigma: 0.5", "sigma: 1000"), "workload[0].input_tokens.sigma", "sigma:", "in [0, 10]"),
    (("at: 2", "at: 1.0e+9"), "workload[1].at", "at: 1.0e+9", "in [0, 86400]"),
    (("  - at: 5\n", "  - at: 99999999\n"), "timeline[0].at", "at: 9999", "in [0, 86400]"),
    (("seed: 1", "seed: 1" + "0" * 400), "seed", "seed:", "got an integer of 401 digits"),
    (("rate: 4", "rate: 1" + "0" * 400), "workload[0].rate", "rate:", "got an integer of 401 digits"),
]


@pytest.mark.parametrize("edit, key, marker, allowed", BOUNDS, ids=[f"{b[1]}={b[0][1][:24].strip()}" for b in BOUNDS])
def test_what_a_preset_asks_for_is_bounded(tmp_path, edit, key, marker, allowed):
    old, new = edit
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    message = error_for(tmp_path, text)
    assert f"bad.yaml, line {line_of(text, marker)}: {key}:" in message, message
    assert allowed in message, message


def _laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nname: bomb\n"


def test_alias_expansion_bomb_is_refused():
    message = parse_within(_laughs(8))
    assert message.startswith("p.yaml, line ") and "expands to more than 100,000 nodes" in message


def test_aliases_within_reason_still_work():
    text = GOOD.replace("    output_tokens: 8\n", "    output_tokens: &out 8\n", 1).replace(
        "output_tokens: {dist: constant, value: 4}", "output_tokens: *out")
    preset = parse_preset(text, "ok.yaml")
    assert preset.workload[1].output_tokens == 8


@pytest.mark.parametrize("opener, closer", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_a_clear_error(opener, closer):
    text = "name: deep\nworkload: " + opener * 20_000 + "1" + closer * 20_000 + "\n"
    message = parse_within(text)
    assert message.startswith("p.yaml, line 2: ") and "nested more than 64 levels" in message


def test_deep_block_nesting_is_a_clear_error():
    text = "name: deep\nworkload:\n" + "".join("  " * i + f"k{i}:\n" for i in range(20_000)) + "  " * 20_000 + "1\n"
    message = parse_within(text)
    assert "nested more than 64 levels" in message


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("a test preset", "caf\xe9").encode("latin-1"))
    with pytest.raises(PresetError) as info:
        load_preset(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 2: not valid UTF-8: byte 0xe9 at column 17"), message


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    text = GOOD.replace("    rate: 4\n", "    rate: 4\n    rate: 40\n", 1)
    message = error_for(tmp_path, text)
    first, again = line_of(text, "rate: 4"), line_of(text, "rate: 40")
    assert f"line {again}: workload[0].rate: duplicate key 'rate': first at line {first}, again at line {again}" \
        in message, message
    top = error_for(tmp_path, GOOD + "seed: 2\n")
    assert f"seed: duplicate key 'seed': first at line {line_of(GOOD, 'seed: 1')}" in top


def test_a_trillion_request_stream_allocates_nothing_up_front():
    """Run in a child process under a 1 GiB address-space cap: generating up front would run out."""
    code = textwrap.dedent("""
        import itertools, resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from batchdeck.presets.schema import PoissonSpec
        from batchdeck.presets.workload_streams import generate_open_loop
        items = generate_open_loop([PoissonSpec(rate=1000.0, count=10**12, input_tokens=512, output_tokens=8)], 0, 4096)
        first = list(itertools.islice(iter(items), 2000))
        assert len(items) == 10**12 and len(first) == 2000 and items[1999] == first[-1]
        assert all(a.arrival <= b.arrival for a, b in zip(first, first[1:]))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
