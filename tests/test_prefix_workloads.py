"""Workloads that share prefixes: shared system prompts, multi-turn chats (history + the engine's answers),
trace replay from block hash ids, their preset schema (with clear errors), and the shipped lesson."""
from __future__ import annotations

import dataclasses
import json

import pytest

from batchdeck.presets import load_preset
from batchdeck.presets.prefix_workloads import MultiTurnStream, block_tokens, hash_id_prompts
from batchdeck.presets.schema import PresetError, parse_preset
from batchdeck.presets.workload_streams import closed_loop_streams, generate_open_loop

BASE = """
name: t
model: synthetic:tiny
workload:
"""


def preset(text: str, tmp_path=None):
    return parse_preset(BASE + text, "t.yaml", base_dir=tmp_path)


def test_shared_system_prompt_goes_before_a_share_of_the_prompts():
    p = preset("""
  - kind: poisson
    rate: 50
    count: 400
    input_tokens: 20
    output_tokens: 4
    prefix: {tokens: 32, share: 0.5, variants: 2}
""")
    items = generate_open_loop(p.workload, seed=1, max_model_len=4096)
    plain = generate_open_loop([type(p.workload[0])(**{**p.workload[0].__dict__, "prefix": None})], 1, 4096)
    assert [i.arrival for i in items] == [i.arrival for i in plain]  # arrivals unchanged by the prefix
    with_prefix = [i for i in items if i.num_prompt_tokens == 52]
    assert 150 < len(with_prefix) < 250 and all(i.num_prompt_tokens in (20, 52) for i in items)
    assert len({tuple(i.prompt_token_ids[:32]) for i in with_prefix}) == 2
    assert all(i.prompt_token_ids[32:] == j.prompt_token_ids for i, j in zip(items, plain) if i.num_prompt_tokens == 52)


def test_multi_turn_resends_history_with_the_answers_after_think_time():
    p = preset("""
  - kind: multi-turn
    conversations: 3
    turns: 3
    rate: 2
    think_time: 1.5
    user_tokens: {dist: uniform, min: 4, max: 8}
    output_tokens: 5
    prefix: {tokens: 16}
""")
    (stream,) = closed_loop_streams(p.workload, seed=3, max_model_len=4096)
    assert isinstance(stream, MultiTurnStream)
    first = stream.initial()
    assert len(first) == 3 and first[0].arrival == 0.0 and first[1].arrival > 0.0
    assert all(i.prompt_token_ids[:16] == first[0].prompt_token_ids[:16] for i in first)  # shared system prompt
    answer = [7, 7, 7, 7, 7]
    turn2 = stream.on_finished(10.0, first[1], answer)
    assert turn2.conversation == 1 and turn2.turn == 1 and turn2.arrival > 10.0
    assert turn2.prompt_token_ids[:len(first[1].prompt_token_ids) + 5] == first[1].prompt_token_ids + answer
    turn3 = stream.on_finished(20.0, turn2, answer)
    assert turn3.turn == 2 and stream.on_finished(30.0, turn3, answer) is None  # three turns, then done
    assert stream.issued == 5 and not stream.exhausted


def test_trace_hash_ids_become_shared_token_blocks(tmp_path):
    rows = [{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1, 2, 3]},
            {"timestamp": 5, "input_length": 9, "output_length": 2, "hash_ids": [1, 2, 4]},
            {"timestamp": 9, "input_length": 12, "output_length": 2, "hash_ids": [5]}]
    (tmp_path / "mooncake.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = preset("""
  - kind: trace
    path: mooncake.jsonl
    columns: {time: timestamp, input: input_length, output: output_length}
    time_unit: ms
    hash_ids: hash_ids
    hash_block_tokens: 4
""", tmp_path)
    items = generate_open_loop(p.workload, seed=0, max_model_len=4096, base_dir=tmp_path)
    a, b, c = (i.prompt_token_ids for i in items)
    assert len(a) == 10 and len(b) == 9 and len(c) == 12
    assert a[:8] == b[:8] == block_tokens(0, 1, 4) + block_tokens(0, 2, 4) and a[8:] != b[8:9]
    assert c[:4] == block_tokens(0, 5, 4) and c[:4] != a[:4]
    assert hash_id_prompts([[1]], [2], 4, 0, __import__("random").Random(0)) == [block_tokens(0, 1, 4)[:2]]
    # a hand-built spec with a relative path: rows and hash ids both come from base_dir, whatever the cwd
    relative = [dataclasses.replace(p.workload[0], path="mooncake.jsonl")]
    again = generate_open_loop(relative, seed=0, max_model_len=4096, base_dir=tmp_path)
    assert [i.prompt_token_ids for i in again] == [a, b, c]


@pytest.mark.parametrize("stream,message", [
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 0}}",
     r"workload\[0\].prefix.tokens: must be an integer in \[1, 1048576\], got 0"),
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 8, share: 2}}",
     r"workload\[0\].prefix.share: must be a number in \[0, 1\]"),
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 8, size: 2}}",
     r"unknown prefix key 'size'; allowed: tokens, share, variants"),
    ("  - {kind: multi-turn, turns: 2, user_tokens: 4, output_tokens: 2}",
     r"workload\[0\]: missing required key 'conversations'"),
    ("  - {kind: multi-turn, conversations: 2, turns: 2, user_tokens: 4, output_tokens: 2, think_time: -1}",
     r"workload\[0\].think_time: must be a number in \[0, 86400\], got -1"),
    ("  - {kind: multi-turn, conversations: 2, turns: 2, user_tokens: 4, output_tokens: 2, rate: 0}",
     r"workload\[0\].rate: must be a number in \(0, 100000\], got 0"),
])
def test_bad_prefix_structure_names_the_key_and_line(stream, message):
    with pytest.raises(PresetError, match=message) as err:
        preset(stream + "\n")
    assert err.value.line == 5


MULTI_TURN = """
  - kind: multi-turn
    conversations: 4
    turns: 3
    rate: 2
    think_time: 0.5
    user_tokens: 8
    output_tokens: 4
    prefix:
      tokens: 16
      share: 0.5
      variants: 2
"""
TRACE = """
  - kind: trace
    path: t.csv
    columns: {time: t, input: i, output: o}
    start: 0
    hash_ids: ids
    hash_block_tokens: 512
"""


@pytest.mark.parametrize("text,edits,key,message", [
    (MULTI_TURN, {"conversations: 4": "conversations: 1000001"}, "conversations",
     r"workload\[0\].conversations: must be an integer in \[1, 1000000\], got 1000001"),
    (MULTI_TURN, {"turns: 3": "turns: 10001"}, "turns",
     r"workload\[0\].turns: must be an integer in \[1, 10000\], got 10001"),
    (MULTI_TURN, {"conversations: 4": "conversations: 400000"}, "turns",
     r"workload\[0\].turns: 400,000 conversations x 3 turns are 1,200,000 requests; at most 1,000,000 per stream"),
    (MULTI_TURN, {"rate: 2": "rate: 100001"}, "rate",
     r"workload\[0\].rate: must be a number in \(0, 100000\], got 100001"),
    (MULTI_TURN, {"think_time: 0.5": "think_time: 86401"}, "think_time",
     r"workload\[0\].think_time: must be a number in \[0, 86400\], got 86401"),
    (MULTI_TURN, {"tokens: 16": "tokens: 1048577"}, "tokens",
     r"workload\[0\].prefix.tokens: must be an integer in \[1, 1048576\], got 1048577"),
    (MULTI_TURN, {"share: 0.5": "share: 1.5"}, "share",
     r"workload\[0\].prefix.share: must be a number in \[0, 1\], got 1.5"),
    (MULTI_TURN, {"variants: 2": "variants: 10001"}, "variants",
     r"workload\[0\].prefix.variants: must be an integer in \[1, 10000\], got 10001"),
    (MULTI_TURN, {"tokens: 16": "tokens: 1048576", "variants: 2": "variants: 17"}, "variants",
     r"workload\[0\].prefix.variants: 17 system prompts of 1,048,576 tokens are 17,825,792 tokens; "
     r"at most 16,777,216 together"),
    (TRACE, {"start: 0": "start: 40000000"}, "start",
     r"workload\[0\].start: must be a number in \[0, 3.1536e\+07\], got 40000000"),
    (TRACE, {"hash_block_tokens: 512": "hash_block_tokens: 2000000"}, "hash_block_tokens",
     r"workload\[0\].hash_block_tokens: must be an integer in \[1, 1048576\], got 2000000"),
])
def test_prefix_and_multi_turn_fields_are_bounded(tmp_path, text, edits, key, message):
    """Every numeric field of the prefix / multi-turn / hash-id schema has an upper bound; a value past
    it is refused naming the field, the value, the allowed range and its line."""
    (tmp_path / "t.csv").write_text("t,i,o,ids\n0,4,2,[1]\n")
    preset(text, tmp_path)  # the unchanged stream is valid
    bad = text
    for old, new in edits.items():
        bad = bad.replace(old, new)
    with pytest.raises(PresetError, match=message) as err:
        preset(bad, tmp_path)
    lines = (BASE + bad).splitlines()
    assert err.value.line == next(i for i, ln in enumerate(lines, 1) if ln.strip().startswith(key + ":"))
    assert str(err.value).startswith(f"t.yaml, line {err.value.line}: ")


def test_trace_hash_ids_column_must_exist(tmp_path):
    (tmp_path / "t.csv").write_text("t,i,o\n0,4,2\n")
    with pytest.raises(PresetError, match=r"hash_ids: column 'ids' not in t.csv; it has: t, i, o"):
        preset("""
  - kind: trace
    path: t.csv
    columns: {time: t, input: i, output: o}
    hash_ids: ids
""", tmp_path)


def test_the_lesson_preset_loads_and_steps_through_caching_and_the_policy():
    p = load_preset("presets/prefix-caching.yaml")
    assert p.config["prefix_caching"] is False and p.config["policy"] == "fcfs"
    assert [e.set for e in p.timeline] == [{"prefix_caching": True}, {"policy": "cache-aware"}]
    assert p.workload[0].kind == "multi-turn"
