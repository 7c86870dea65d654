"""Workloads that share prefixes: shared system prompts, multi-turn chats (history + the engine's answers),
trace replay from block hash ids, their preset schema (with clear errors), and the shipped lesson."""
from __future__ import annotations

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


@pytest.mark.parametrize("stream,message", [
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 0}}",
     r"workload\[0\].prefix.tokens: must be an integer >= 1"),
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 8, share: 2}}",
     r"workload\[0\].prefix.share: must be a number in \[0, 1\]"),
    ("  - {kind: poisson, rate: 1, count: 2, input_tokens: 4, output_tokens: 2, prefix: {tokens: 8, size: 2}}",
     r"unknown prefix key 'size'; allowed: tokens, share, variants"),
    ("  - {kind: multi-turn, turns: 2, user_tokens: 4, output_tokens: 2}",
     r"workload\[0\]: missing required key 'conversations'"),
    ("  - {kind: multi-turn, conversations: 2, turns: 2, user_tokens: 4, output_tokens: 2, think_time: -1}",
     r"workload\[0\].think_time: must be a number >= 0"),
    ("  - {kind: multi-turn, conversations: 2, turns: 2, user_tokens: 4, output_tokens: 2, rate: 0}",
     r"workload\[0\].rate: must be a number > 0"),
])
def test_bad_prefix_structure_names_the_key_and_line(stream, message):
    with pytest.raises(PresetError, match=message) as err:
        preset(stream + "\n")
    assert err.value.line == 5


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
