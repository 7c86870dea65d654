"""Fuzz `batchdeck generate` input files: random mixes of valid lines and hostile ones.

Every valid line is served exactly once (in input order), every bad one is reported with its line
number, nothing else is reported, and run_generate never raises. synthetic:tiny, 1-3 tokens each.
"""
from __future__ import annotations

import io
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.service.generate import UTF8_BOM, run_generate
from tests.helpers import loaded

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=8)


def valid_line(index: int):
    """A line that must be served: its id is unique (`v<index>`)."""
    return st.fixed_dictionaries(
        {"id": st.just(f"v{index}"), "max_tokens": st.integers(1, 3)},
        optional={"temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.05, 1.0), "seed": st.integers(0, 2**32),
                  "arrival_time": st.floats(0.0, 0.02), "tenant": text, "priority": st.integers(-5, 5),
                  "ignore_eos": st.booleans()},
    ).flatmap(lambda fields: st.one_of(
        text.map(lambda p: {**fields, "prompt": p}),
        st.lists(st.integers(0, 511), min_size=1, max_size=6).map(lambda ids: {**fields, "prompt_token_ids": ids}),
    )).map(lambda obj: json.dumps(obj).encode())


def _with(field: str, raw: str) -> bytes:
    return ('{"prompt": "x", "max_tokens": 1, "%s": %s}' % (field, raw)).encode()


hostile_line = st.one_of(
    # numbers far out of range, including integers too long for a float or for Python's int parser
    st.builds(lambda f, k: _with(f, "1" + "0" * k), st.sampled_from(["max_tokens", "top_k", "seed", "priority"]),
              st.integers(20, 400)),
    st.builds(lambda k: _with("id", "7" * k), st.integers(4301, 6000)),
    st.builds(lambda k: _with("id", json.dumps("i" * k)), st.integers(257, 5000)),
    # NaN / Infinity where numbers go
    st.builds(_with, st.sampled_from(["temperature", "top_p", "arrival_time"]),
              st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"])),
    # far-future arrivals
    st.builds(lambda t: _with("arrival_time", repr(t)), st.floats(3600.5, 1e300)),
    # invalid UTF-8 inside a string
    st.builds(lambda bad: b'{"prompt": "a' + bad + b'b", "max_tokens": 1}',
              st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])),
    # lone surrogates (as JSON escapes) in text fields
    st.builds(lambda f, s: _with(f, json.dumps(s)), st.sampled_from(["prompt", "tenant", "id"]),
              st.sampled_from(["\ud800", "a\udfff", "\udc00z"])),
    # deep nesting, at any depth
    st.builds(lambda d, open_: _with("prompt", open_ * d), st.integers(2, 100_000), st.sampled_from(["[", '{"a":'])),
    # not JSON at all, or JSON that is not an object
    st.sampled_from([b"{not json", b"[1, 2]", b'"text"', b"null", b'{"prompt": "x", "bogus": 1}']),
)


@st.composite
def input_files(draw):
    kinds = draw(st.lists(st.booleans(), min_size=1, max_size=8))  # True: valid
    lines, valid_ids, bad_lines = [], [], []
    for line_no, is_valid in enumerate(kinds, start=1):
        if is_valid:
            lines.append(draw(valid_line(line_no)))
            valid_ids.append(f"v{line_no}")
        else:
            lines.append(draw(hostile_line))
            bad_lines.append(line_no)
    if draw(st.booleans()):
        lines[0] = UTF8_BOM + lines[0]
    return b"\n".join(lines) + b"\n", valid_ids, bad_lines


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(input_files())
def test_generate_survives_any_mix_of_valid_and_hostile_lines(case):
    data, valid_ids, bad_lines = case
    engine = LLMEngine(EngineConfig(model="synthetic:tiny", device="cpu", num_blocks=64, block_size=4),
                       LiveConfig(max_num_seqs=4), loaded=loaded("synthetic:tiny"), check_invariants=True)
    out, errors = io.StringIO(), io.StringIO()
    rc = run_generate(engine, io.BytesIO(data), out, input_name="in.jsonl", output_name="out.jsonl", errors=errors,
                      progress=False)
    report = errors.getvalue()
    served = [json.loads(line)["id"] for line in out.getvalue().splitlines()]
    assert served == valid_ids, report
    reported = [int(n) for n in re.findall(r"^in\.jsonl:(\d+): ", report, flags=re.MULTILINE)]
    assert reported == bad_lines, report
    assert rc == (1 if bad_lines else 0)
