"""The console's pure parts: palette parsing/validation, dashboard state, chart, recording format."""
import json

import pytest
from textual.content import Content

from batchdeck.console.client import FakeClient, bounds_from_dict, default_snapshot, make_burst
from batchdeck.console.commands import candidates, describe_bounds, validate
from batchdeck.console.demo import synthetic_session
from batchdeck.console.mqtt_client import parse_attach_url
from batchdeck.console.player import ReplayClient
from batchdeck.engine.service.protocol import decode, encode
from batchdeck.engine.service.recording import RecordingError, RecordingWriter, read_recording
from batchdeck.console.speculation import summary
from batchdeck.console.state import DashboardState, format_action, format_event
from batchdeck.console.widgets.batch_chart import Column, columns_for, render_chart
from batchdeck.engine.telemetry import Event, IterationRecord

SNAP = default_snapshot()
CFG, BOUNDS = SNAP["config"], SNAP["bounds"]


def test_palette_parses_and_validates_every_setting():
    (c,) = candidates("policy sjf", CFG, BOUNDS)
    assert c.changes == {"policy": "sjf"} and c.error is None and c.exact
    (c,) = candidates("max_num_seqs 16", CFG, BOUNDS)
    assert c.changes == {"max_num_seqs": 16}
    (c,) = candidates("chunk-size 256", CFG, BOUNDS)  # hyphens work too
    assert c.changes == {"chunk_size": 256}
    (c,) = candidates("preemption drain", CFG, BOUNDS)
    assert c.changes == {"preemption": "drain"}
    (c,) = candidates("batching static", CFG, BOUNDS)
    assert c.changes == {"batching": "static"}
    (c,) = candidates("mixing prefill-first", CFG, BOUNDS)
    assert c.changes == {"mixing": "prefill-first"}
    (c,) = candidates("max_batched_tokens 1024", CFG, BOUNDS)
    assert c.changes == {"max_batched_tokens": 1024}
    (c,) = candidates("static_timeout 2.5", CFG, BOUNDS)
    assert c.changes == {"static_timeout": 2.5}
    (c,) = candidates("spec_k 4", CFG, BOUNDS)
    assert c.changes == {"spec_k": 4} and "allowed 0..8" in c.help
    (c,) = candidates("spec-k 0", CFG, BOUNDS)  # 0 turns speculation off
    assert c.changes == {"spec_k": 0}
    # still typing a choice: the matching values are offered
    assert [c.changes for c in candidates("policy s", CFG, BOUNDS)] == [{"policy": "sjf"}, {"policy": "slo"}]
    # with no value, every setting and action is offered for fuzzy matching
    texts = [c.text for c in candidates("", CFG, BOUNDS)]
    assert "policy fair" in texts and "pause engine" in texts and any(t.startswith("max_num_seqs <") for t in texts)
    (listed,) = [c for c in candidates("", CFG, BOUNDS) if c.text.startswith("spec_k")]
    assert listed.text == "spec_k <0..8>" and "0 = off" in listed.help


@pytest.mark.parametrize("query, why", [
    ("max_num_seqs 9999", "max_num_seqs=9999 is not allowed: an integer in [1, 256]"),
    ("max_num_seqs 0", "an integer in [1, 256]"),
    ("max_num_seqs many", "max_num_seqs='many' is not allowed: an integer"),
    ("chunk_size 1024", "chunk_size=1024 is not allowed: an integer in [1, 512] (the live max_batched_tokens)"),
    ("policy lifo", "policy='lifo' is not allowed: one of fcfs, sjf, slo, fair, priority"),
    ("batching dynamic", "one of continuous, static"),
    ("static_timeout -1", "static_timeout=-1.0"),
    ("spec_k 9", "spec_k=9 is not allowed: an integer in [0, 8]"),
    ("spec_k -1", "spec_k=-1 is not allowed: an integer in [0, 8]"),
    ("spec_k 2.5", "spec_k='2.5' is not allowed: an integer"),
])
def test_palette_refuses_invalid_values_with_the_reason(query, why):
    (c,) = candidates(query, CFG, BOUNDS)
    assert c.changes is None and c.error is not None and why in c.error, c
    assert c.exact and c.help.startswith("refused:")


def test_local_validation_matches_the_engine():
    assert validate({"policy": "fair"}, CFG, BOUNDS) is None
    assert "max_batched_tokens" in validate({"max_batched_tokens": 100}, CFG, BOUNDS)  # < chunk_size 256
    assert validate({"max_batched_tokens": 100, "chunk_size": 64}, CFG, BOUNDS) is None
    b = bounds_from_dict(BOUNDS)
    assert b.max_num_seqs == 256 and b.max_batched_tokens == 8192 and "priority" in b.policies and b.spec_k == 8


def test_spec_k_is_checked_against_the_engines_own_bound():
    """An engine started with a smaller speculation limit: the console refuses past it, naming the range."""
    bounds = {**BOUNDS, "spec_k": [0, 3]}
    assert bounds_from_dict(bounds).spec_k == 3
    assert validate({"spec_k": 3}, CFG, bounds) is None
    assert validate({"spec_k": 4}, CFG, bounds) == "spec_k=4 is not allowed: an integer in [0, 3] (spec_k_limit, fixed at start)"
    (c,) = candidates("spec_k 4", CFG, bounds)
    assert c.changes is None and c.error == "spec_k=4 is not allowed: an integer in [0, 3] (spec_k_limit, fixed at start)"
    assert describe_bounds("spec_k", CFG, bounds) == "0..3"
    assert describe_bounds("spec_k", CFG, None) == "an integer ≥ 0"


def test_dashboard_state_aggregates_speculation_over_its_window():
    st = DashboardState(window_s=5.0, history=50)
    st.ingest(synthetic_session(300, change_at=None, spec_k=4, spec_accept=0.7))
    spec = st.snapshot(st.last_time)["speculation"]
    recent = [r for topic, r in synthetic_session(300, change_at=None, spec_k=4, spec_accept=0.7)
              if topic == "iteration" and r.time > st.last_time - 5.0]
    assert len(recent) > len(st.iterations)  # the window, not the (shorter) iteration history
    proposed, accepted = sum(r.spec_proposed for r in recent), sum(r.spec_accepted for r in recent)
    assert (spec["proposed"], spec["accepted"]) == (proposed, accepted) and 0 < accepted < proposed
    assert spec["acceptance_rate"] == accepted / proposed
    assert spec["tokens_per_iteration"] == sum(r.num_generated_tokens for r in recent) / len(recent)
    plain = DashboardState(window_s=5.0)
    plain.ingest(synthetic_session(300, change_at=None))
    spec = plain.snapshot(None)["speculation"]
    assert spec["acceptance_rate"] is None and spec["tokens_per_iteration"] > 0


def _spec(proposed: int, accepted: int, per_it: float | None) -> dict:
    return {"proposed": proposed, "accepted": accepted, "tokens_per_iteration": per_it,
            "acceptance_rate": accepted / proposed if proposed else None}


def test_spec_summary_line():
    assert summary(_spec(8, 6, 2.5), 4) == "accepted [b]75%[/] · [b]2.50[/] tok/it"
    assert summary(_spec(8, 6, 2.5), 0) == "accepted [b]75%[/] · [b]2.50[/] tok/it"  # just turned off
    assert summary(_spec(0, 0, 1.0), 4) == "accepted [b]-[/] · [b]1.00[/] tok/it"  # on, no draft found yet
    assert summary(_spec(0, 0, 1.0), 0) == "spec off · [b]1.00[/] tok/it"
    assert summary(_spec(0, 0, None), None) == "accepted [b]-[/] · [b]-[/] tok/it"
    longest = summary(_spec(1, 1, 9999.0), 8)
    assert len(Content.from_markup(longest).plain) <= 30  # fits the plot's border at 120 columns


def test_synthetic_session_speculates_only_when_asked():
    assert not any(getattr(r, "spec_proposed", 0) for _, r in synthetic_session(300))
    its = [r for t, r in synthetic_session(300, change_at=None, spec_k=3) if t == "iteration"]
    assert sum(r.spec_proposed for r in its) > sum(r.spec_accepted for r in its) > 0
    assert all(r.spec_accepted <= r.spec_proposed for r in its)
    reqs = [r for t, r in synthetic_session(300, change_at=None, spec_k=3) if t == "request"]
    assert reqs and any(r.spec_accepted > 0 for r in reqs)


def test_state_ingests_telemetry_into_ring_buffers():
    st = DashboardState(window_s=5.0, history=100)
    st.apply_snapshot(default_snapshot())
    msgs = synthetic_session(300, change_at=200)
    st.ingest(msgs)
    assert len(st.iterations) == 100 and st.latest.iteration == 299
    (mark,) = st.marks
    assert mark.iteration == 200 and "policy=sjf" in mark.label
    assert st.config["policy"] == "sjf" and st.version == 1  # the config_change was merged
    lines = st.take_new_log()
    assert any("→ it 200" in line.text and line.kind == "config_change" for line in lines)
    assert st.take_new_log() == []
    times, prompt, gen = st.throughput_series(st.last_time)
    assert times == sorted(times) and len(times) == len(gen) and sum(gen) > 0
    snap = st.snapshot(st.last_time)
    assert snap["num_requests_finished"] > 0 and snap["generation_throughput"] > 0
    assert st.requests and all(r["state"] in ("prefill", "decode", "waiting", "preempted") for r in st.requests.values())


def test_event_and_action_lines():
    e = Event("config_change", 3.0, 41, {"changes": {"policy": "sjf"}, "applied_iteration": 42, "source": "console",
                                         "version": 2})
    assert format_event(e).text == "config v2 policy=sjf → it 42 (console)"
    assert "preempt r1" in format_event(Event("preemption", 1.0, 5, {"request_id": "r1", "tenant": "a"})).text
    assert format_event(Event("error", 1.0, 5, {"message": "boom"})).kind == "error"
    line = format_action({"op": "set", "changes": {"max_num_seqs": 4}, "ok": True, "applied_iteration": 9})
    assert line.text == "operator: set max_num_seqs=4 → it 9"
    line = format_action({"op": "set", "changes": {"max_num_seqs": 0}, "ok": False, "error": "no"})
    assert line.kind == "refused" and "refused: no" in line.text


def test_batch_chart_marks_config_changes_and_averages_to_fit():
    cols = [Column(i, 8, 100 if i % 5 == 0 else 0) for i in range(100, 140)]
    from batchdeck.console.state import Mark

    text = render_chart(cols, [Mark(120, 1.0, "policy=sjf")], width=46, height=8, budget=512).plain
    lines = text.split("\n")
    assert len(lines) == 8 and all(len(line) == 46 for line in lines)
    assert lines[0].startswith("  512┤") and "▲" in lines[-1] and "it 100" in lines[-1] and "139" in lines[-1]
    assert lines[0][6 + 20] == "│"  # the rule sits in iteration 120's column
    recs = [IterationRecord(i, i * 0.01, 0.01, 0, 0, 0, 0, 64, 8, 1, 8, 0, 0, 10, 100, 0.1, 0) for i in range(1000)]
    cols = columns_for(recs, width=50, span_s=5.0)
    assert len(cols) <= 50 and cols[-1].iteration + cols[-1].count - 1 == 999 and cols[0].count == 10
    assert cols[0].prefill == 64 and cols[0].decode == 8
    assert len(columns_for(recs, width=50, span_s=None)) == 50


def test_record_json_round_trip():
    for topic, record in synthetic_session(60, gpu=True):
        data = json.loads(json.dumps(encode(record)))
        back = encode(decode(topic, {**data, "unknown_future_field": 1}))
        if topic in ("event", "requests"):  # open-ended: extra keys are kept
            assert back.pop("unknown_future_field") == 1
        assert back == encode(record)
    with pytest.raises(ValueError, match="iteration"):
        decode("iteration", {"iteration": 1})


def test_recorder_writes_typed_lines_and_the_player_replays_them(tmp_path):
    path = tmp_path / "run.jsonl"
    rec = RecordingWriter(path)
    rec.config(default_snapshot(), 0.0)
    msgs = synthetic_session(200, change_at=100)
    rec.write_messages(msgs[: len(msgs) // 2])
    rec.action("set", 2.0, origin="palette", changes={"policy": "sjf"}, ok=True, applied_iteration=100)
    rec.write_messages(msgs[len(msgs) // 2:])
    rec.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["type"] for line in lines} == {"config", "iteration", "request", "event", "requests", "gpu", "action"}
    change = next(line for line in lines if line["type"] == "event" and line["kind"] == "config_change")
    assert change["applied_iteration"] == 100 and change["changes"] == {"policy": "sjf", "max_num_seqs": 4}
    action = next(line for line in lines if line["type"] == "action")
    assert action["op"] == "set" and action["ok"] is True and "wall_time" in action and action["time"] == 2.0

    times, messages, snapshot = read_recording(path)
    assert snapshot["config"]["policy"] == "fcfs" and times == sorted(times)
    assert [m[0] for m in messages].count("iteration") == 200

    player = ReplayClient(path, autoplay=False)
    assert player.read_only and player.position == player.start_time
    player.seek(player.start_time + 1.0)
    first = player.drain()
    assert first and all(getattr(r, "time", 0) <= player.start_time + 1.0 for t, r in first if t == "iteration")
    player.playing = True
    player.set_speed(4.0)
    player.advance(0.5)  # half a second of wall time at 4x: two more seconds of the run
    assert player.position == pytest.approx(player.start_time + 3.0)
    more = player.drain()
    assert more and more[0].topic != "reset"
    player.seek(player.start_time)  # backwards: the dashboard is told to start again
    assert player.drain()[0].topic == "reset"
    player.seek(player.end_time + 100)
    assert player.finished


def test_bad_recordings_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "iteration", "iteration": 1}\n{"type": "gpu", "time": 1, "available": false}\n')
    with pytest.raises(RecordingError, match="bad.jsonl:1: malformed iteration record"):
        read_recording(path)
    path.write_text('not json\n{"type": "gpu", "time": 1, "available": false}\n')
    with pytest.raises(RecordingError, match=":1: not JSON"):
        read_recording(path)
    path.write_text('{"type": "gpu", "time": 1, "available": false}\n{"type": "future", "x": 1}\n{"type": "gp')
    times, messages, _ = read_recording(path)  # unknown types skipped, a cut-off last line tolerated
    assert [m[0] for m in messages] == ["gpu"]


def test_attach_urls():
    t = parse_attach_url("mqtt://127.0.0.1:1884/e1")
    assert (t.host, t.port, t.engine_id, t.prefix, t.tls) == ("127.0.0.1", 1884, "e1", "batchdeck/e1", False)
    t = parse_attach_url("mqtts://user:p%40ss@broker.example/prod-1")
    assert (t.port, t.username, t.password, t.tls) == (8883, "user", "p@ss", True)
    for bad, why in [("http://h/e", "scheme"), ("mqtt://h:1883", "engine id"), ("mqtt://h:1883/a/b", "engine id"),
                     ("mqtt://:1883/e", "host"), ("mqtt://h:99999/e", "port")]:
        with pytest.raises(ValueError, match=why):
            parse_attach_url(bad)


def test_burst_requests_are_valid_generate_lines():
    from batchdeck.engine.request_spec import parse_request
    from batchdeck.engine.tokenizer import ByteTokenizer

    burst = make_burst(5, prompt_tokens=32, max_tokens=8, seed=1)
    ids = {r["id"] for r in burst}
    assert len(ids) == 5
    for r in burst:
        spec = parse_request(r, ByteTokenizer(), "x")
        assert len(spec.prompt_token_ids) == 32 and spec.sampling.max_tokens == 8 and spec.tenant == "console"


async def test_fake_client_validates_like_the_engine():
    client = FakeClient()
    ok = await client.set({"policy": "sjf"})
    assert ok.ok and ok.config["policy"] == "sjf" and ok.applied_iteration == 0
    bad = await client.set({"max_num_seqs": 999})
    assert not bad.ok and "[1, 256]" in bad.error
    assert [m.topic for m in client.drain()] == ["event"]


async def test_a_batchdeck_replay_recording_plays_in_the_console(tmp_path):
    """`batchdeck replay --record` files have the console's format: they load and feed the dashboard."""
    from batchdeck.presets import parse_preset
    from batchdeck.presets.replay import run_preset_async

    preset = parse_preset(
        "name: tiny-lesson\ndescription: a burst and one change\nmodel: synthetic:tiny\n"
        "engine: {num_blocks: 128}\nconfig: {max_num_seqs: 2}\n"
        "workload:\n  - {kind: burst, at: 0, count: 4, input_tokens: 16, output_tokens: 8}\n"
        "timeline:\n  - {at_iteration: 3, set: {policy: sjf}}\nseed: 1\n", "tiny-lesson.yaml")
    path = tmp_path / "replay.jsonl"
    await run_preset_async(preset, record=path)
    times, messages, snapshot = read_recording(path)
    assert snapshot is not None and snapshot["config"]["policy"] == "fcfs"
    kinds = {topic for topic, _ in messages}
    assert {"iteration", "request", "action"} <= kinds
    st = DashboardState()
    st.apply_snapshot(snapshot)
    st.ingest(messages)
    assert st.latest is not None and st.finished_total > 0
    assert any(line.text.startswith("preset tiny-lesson") for line in st.log)
    assert any("preset: set policy=sjf → it" in line.text for line in st.log)
    assert st.marks and st.marks[-1].label == "policy=sjf"


def test_a_finished_request_leaves_the_table_without_waiting_for_a_snapshot():
    st = DashboardState()
    st.ingest([("requests", {"time": 1.0, "iteration": 5, "requests": [
        {"request_id": "a", "state": "decode"}, {"request_id": "b", "state": "waiting"}]})])
    seq = st.requests_seq
    (finished,) = [r for t, r in synthetic_session(200) if t == "request"][:1]
    finished.request_id = "a"
    st.ingest([("request", finished)])
    assert list(st.requests) == ["b"] and st.requests_seq == seq + 1


def test_the_console_shows_the_config_the_engine_runs_not_the_change_it_was_asked(model_dirs):
    """A policy switch brings that policy's default parameters; switching back drops them. The console took
    the requested change as the new config, so it showed {} for sjf's defaults and kept stale ones after."""
    from batchdeck.engine.telemetry import ListSink
    from tests.helpers import make_engine

    sink = ListSink()
    engine = make_engine(model_dirs["llama"], sink=sink, num_blocks=64)
    st = DashboardState(window_s=5.0, history=100)
    st.apply_snapshot(engine.config_snapshot())
    for changes in ({"policy": "sjf"}, {"policy_params": {"aging_s": 5}}, {"policy": "fcfs"}):
        engine.update_config(changes, source="preset")
        engine.apply_pending_config()
        st.ingest([("event", e) for e in sink.events[-1:]])
        assert st.config["policy_params"] == dict(engine.live.policy_params), changes
        assert st.config["policy"] == engine.live.policy and st.version == engine.live.version
    # a recording made before events carried the config still applies the change itself
    old = Event("config_change", 1.0, 3, {"changes": {"max_num_seqs": 3}, "applied_iteration": 3, "version": 9})
    st.ingest([("event", old)])
    assert st.config["max_num_seqs"] == 3 and st.version == 9


def test_palette_speaks_vllm_names_checks_policy_params_and_shows_the_bound_in_force(model_dirs):
    from tests.helpers import make_engine

    snap = make_engine(model_dirs["llama"], num_blocks=64, chunk_size=64, max_batched_tokens=512).config_snapshot()
    config, bounds = snap["config"], snap["bounds"]
    (c,) = candidates("max_num_batched_tokens 300", config, bounds)  # vLLM's names, as the flags take them
    assert c.changes == {"max_batched_tokens": 300} and c.error is None
    (c,) = candidates("scheduling_policy sjf", config, bounds)
    assert c.changes == {"policy": "sjf"}
    # the floor another setting puts on it, not the table's 1
    assert describe_bounds("max_batched_tokens", config, bounds).startswith("64..")
    # policy parameters checked against the specs the engine published, before anything is sent
    assert "a parameter of policy fcfs: none" in validate({"policy_params": {"bogus": 5}}, config, bounds)
    sjf = {**config, "policy": "sjf"}
    assert "policy_params.aging_s" in validate({"policy_params": {"aging_s": -5}}, sjf, bounds)
    assert validate({"policy_params": {"aging_s": 5}}, sjf, bounds) is None


def test_clearing_the_prefix_cache_never_turns_caching_on():
    on = [c for c in candidates("", {"prefix_caching": True}, None) if c.text == "clear prefix cache"]
    assert on[0].sequence and on[0].sequence[-1] == {"prefix_caching": True}
    (off,) = [c for c in candidates("", {"prefix_caching": False}, None) if c.text == "clear prefix cache"]
    assert not off.sequence and "prefix caching is off" in off.error
