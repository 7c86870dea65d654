"""The wire protocol both ends of MQTT share: topics, record codec, command form; and the one recording format."""
import io
import json
import math

from batchdeck.engine.service import protocol
from batchdeck.engine.service.recording import RecordingWriter, read_recording, recording_line
from batchdeck.engine.telemetry import Event, IterationRecord


def test_topic_map_reads_back_what_it_publishes():
    assert protocol.topic_prefix("lab1") == "batchdeck/lab1"
    assert protocol.TELEMETRY_TOPICS == {"iteration": "telemetry/iteration", "request": "telemetry/request",
                                         "gpu": "telemetry/gpu", "requests": "telemetry/requests",
                                         "event": "events", "result": "results"}  # a contract: never renamed
    for topic, suffix in protocol.TELEMETRY_TOPICS.items():
        assert protocol.BUS_TOPICS[suffix] == topic
    assert protocol.subtopic("batchdeck/e1", "batchdeck/e1/control/reply") == protocol.CONTROL_REPLY
    assert protocol.subtopic("batchdeck/e1", "batchdeck/e10/status") is None


def test_dumps_writes_nan_and_infinity_as_null_at_any_depth():
    text = protocol.dumps({"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2.5})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2.5}
    assert b"NaN" not in text and b"Infinity" not in text


def test_a_command_parses_back_on_the_engine_side():
    payload = protocol.command("s-1", "set", params={"max_num_seqs": 3})
    assert protocol.parse_control(payload) == protocol.Command("s-1", "set", params={"max_num_seqs": 3})


def test_sink_lines_and_console_lines_are_one_format(tmp_path):
    rec = IterationRecord(3, 1.5, 0.01, 0, 0, 0, 0, 64, 8, 1, 8, 0, 0, 10, 100, 0.1, 0, ttfts=[0.2])
    event = Event("config_change", 1.6, 4, {"changes": {"policy": "sjf"}, "source": "preset"})
    stream = io.StringIO()
    sink_side = RecordingWriter(stream)  # as `batchdeck replay --record` uses it: a telemetry sink
    sink_side("iteration", rec)
    sink_side("event", event)
    sink_side.close()
    path = tmp_path / "console.jsonl"
    console_side = RecordingWriter(path)  # as the console uses it
    console_side.write_messages([("iteration", rec), ("event", event), ("reset", None)])
    console_side.close()
    assert stream.getvalue() == path.read_text()
    assert json.loads(stream.getvalue().splitlines()[1]) == recording_line("event", event) == {
        "type": "event", "changes": {"policy": "sjf"}, "source": "preset", "kind": "config_change", "time": 1.6,
        "iteration": 4}
    times, messages, snapshot = read_recording(path)
    assert times == [1.5, 1.6] and snapshot is None
    assert messages == [("iteration", rec), ("event", event)]


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    import random

    import pytest

    from batchdeck.engine.service.backoff import Backoff

    b = Backoff(0.1, 0.5, jitter=0.0)
    assert [b.delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.delay() == 0.1
    jittered = Backoff(1.0, 1.0, jitter=0.2, rng=random.Random(3))
    assert all(0.8 <= jittered.delay() <= 1.2 for _ in range(100))
    with pytest.raises(ValueError, match="minimum <= maximum"):
        Backoff(2.0, 1.0)
