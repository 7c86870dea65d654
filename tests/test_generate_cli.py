import json

from batchdeck.cli import main
from tests.helpers import reference_tokens


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


def test_generate_serves_valid_lines_and_reports_bad_ones(tmp_path, model_dirs, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [
        {"id": "a", "prompt": "hello", "max_tokens": 5, "ignore_eos": True},
        "{not json",
        {"id": "b", "prompt_token_ids": [1, 2, 3], "max_tokens": 0},
        {"id": "c", "prompt_token_ids": [7] * 600, "max_tokens": 4},
        {"id": "d", "prompt_token_ids": [4, 5], "max_tokens": 3, "arrival_time": 0.05, "ignore_eos": True,
         "tenant": "t1", "priority": 2, "slo_class": "batch"},
    ])
    rc = main(["generate", "--model", model_dirs["qwen2"], "--input", str(src), "--output", str(out),
               "--max-num-seqs", "2", "--chunk-size", "4", "--block-size", "4", "--num-blocks", "200",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "in.jsonl:2: malformed JSON" in err
    assert "in.jsonl:3: max_tokens must be an integer in [1, 2147483647], got 0" in err
    assert "in.jsonl:4: prompt has 600 tokens" in err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "d"]
    a, d = rows
    assert tuple(a["output_token_ids"]) == reference_tokens(model_dirs["qwen2"], tuple(a["prompt_token_ids"]), 5)
    assert a["finish_reason"] == "length" and isinstance(a["text"], str)
    assert d["metrics"]["arrival"] == 0.05 and d["metrics"]["first_token"] >= 0.05
    for key in ("arrival", "first_token", "finish", "ttft", "tpot", "first_token_iteration", "finish_iteration",
                "num_preemptions"):
        assert key in a["metrics"]


def test_generate_unknown_policy_and_model(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "x", "max_tokens": 1}])
    assert main(["generate", "--input", str(src), "--output", str(out), "--policy", "nope"]) == 2
    assert "policy='nope'" in capsys.readouterr().err
    assert main(["generate", "--model", "synthetic:nope", "--input", str(src), "--output", str(out)]) == 2
    assert "unknown synthetic model 'nope'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--input", str(src), "--output", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_policy_params_flag_reaches_the_policy(tmp_path, capsys):
    from batchdeck.cli import build_parser
    from batchdeck.engine.service.flags import engine_configs

    args = build_parser().parse_args(["generate", "--input", "x", "--output", "y", "--policy", "sjf",
                                      "--policy-params", '{"aging_s": 5}'])
    _, live = engine_configs(args)
    assert live.policy == "sjf" and live.policy_params == {"aging_s": 5}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "x", "max_tokens": 1}])
    assert main(["generate", "--input", str(src), "--output", str(out), "--policy", "sjf",
                 "--policy-params", '{"bogus": 1}']) == 2
    assert "policy_params.bogus" in capsys.readouterr().err


# -- hostile input (issue 15 items 4-8) --------------------------------------------------------------

SMALL_ENGINE = ["--device", "cpu", "--block-size", "4", "--num-blocks", "64", "--max-num-seqs", "4"]


def run_cli(argv, deadline_s=180.0):
    """main(argv) in a daemon thread: a hang fails the test instead of stalling the suite."""
    import threading

    result = {}
    worker = threading.Thread(target=lambda: result.update(rc=main(argv)), daemon=True)
    worker.start()
    worker.join(deadline_s)
    assert not worker.is_alive(), f"batchdeck {' '.join(argv[:1])} still running after {deadline_s} s"
    return result["rc"]


HOSTILE = [  # (line bytes, what the report must say)
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 399 + b"}",
     "max_tokens must be an integer in [1, 2147483647], got an integer of 400 digits"),
    (b'{"prompt": "bad \xff utf8", "max_tokens": 2}', "not valid UTF-8: byte 0xff at column 17"),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt contains a lone surrogate '\\ud800' at character 0"),
    (b'{"id": 1' + b"0" * 4999 + b', "prompt": "x"}', "malformed JSON: a number has more than 4300 digits"),
    (b'{"id": "' + b"i" * 5000 + b'", "prompt": "x"}', "id has 5000 characters; at most 256 are allowed"),
    (b"[" * 100_000, "malformed JSON: nested too deeply"),
    (b'{"prompt": "x", "arrival_time": NaN}', "arrival_time must be in [0, 3600] seconds after the start, got nan"),
    (b'{"prompt": "x", "arrival_time": 1e9}', "arrival_time must be in [0, 3600] seconds after the start"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature must be a number in [0, 100] (0 = greedy), got nan"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature must be a number in [0, 100] (0 = greedy), got inf"),
    (b'{"prompt": "x", "top_p": -Infinity}', "top_p must be a number in (0, 1], got -inf"),
    (b"null", "a request must be a JSON object, got null"),
    (b"[1, 2]", "a request must be a JSON object, got an array"),
]


def test_every_hostile_line_is_reported_with_its_line_and_the_rest_served(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [b'{"id": "first", "prompt": "hi", "max_tokens": 2}'] + [line for line, _ in HOSTILE]
    lines.append(b'{"id": "last", "prompt": "ok", "max_tokens": 2}')
    src.write_bytes(b"\n".join(lines) + b"\n")
    rc = run_cli(["generate", "--input", str(src), "--output", str(out), *SMALL_ENGINE])
    err = capsys.readouterr().err
    assert rc == 1
    for line_no, (_, message) in enumerate(HOSTILE, start=2):
        assert f"in.jsonl:{line_no}: {message}" in err, (line_no, message, err[-3000:])
    assert "Traceback" not in err
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["first", "last"]


def test_a_byte_order_mark_keeps_the_first_request(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "hi", "max_tokens": 1}\n{"id": "b", "prompt": "yo", "max_tokens": 1}\n')
    assert run_cli(["generate", "--input", str(src), "--output", str(out), *SMALL_ENGINE]) == 0
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["a", "b"]


def test_values_are_refused_by_field_name_at_every_entry_point():
    """parse_request (generate lines and MQTT submit) and SamplingParams.validate (every engine caller)."""
    import math

    import pytest

    from batchdeck.engine.request import RequestError, SamplingParams
    from batchdeck.engine.request_spec import parse_request
    from batchdeck.engine.tokenizer import ByteTokenizer

    cases = [({"temperature": math.nan}, "temperature must be a number in [0, 100]"),
             ({"temperature": math.inf}, "temperature must be a number in [0, 100]"),
             ({"temperature": 10**400}, "temperature must be a number in [0, 100] (0 = greedy), got an integer of 401"),
             ({"top_p": math.nan}, "top_p must be a number in (0, 1]"),
             ({"max_tokens": 10**400}, "max_tokens must be an integer in [1, 2147483647], got an integer of 401"),
             ({"top_k": 2**40}, "top_k must be an integer in [0, 2147483647] (0 = off)"),
             ({"priority": -10**30}, "priority must be an integer in [-2147483648, 2147483647]"),
             ({"arrival_time": math.inf}, "arrival_time must be a finite number >= 0, got inf"),
             ({"stop_token_ids": [10**50]}, "stop_token_ids[0] must be an integer in [0, 2147483647]"),
             ({"prompt": "a\udfffb"}, "prompt contains a lone surrogate '\\udfff' at character 1"),
             ({"tenant": "\ud800"}, "tenant contains a lone surrogate"),
             ({"id": 10**300}, "id has 301 digits; at most 256 characters are allowed")]
    for fields, message in cases:
        with pytest.raises(RequestError) as err:
            parse_request({"prompt": "x", **fields}, ByteTokenizer(), default_id="1")
        assert message in str(err.value), (fields, str(err.value))
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(RequestError, match="temperature"):
            SamplingParams(temperature=bad).validate()


def test_an_out_of_vocabulary_token_id_is_named_with_its_position(model_dirs):
    import pytest

    from batchdeck.engine.request import RequestError
    from tests.helpers import greedy, make_engine

    engine = make_engine(model_dirs["llama"], num_blocks=64)
    vocab = engine.loaded.config.vocab_size
    with pytest.raises(RequestError, match=rf"prompt_token_ids\[2\] = {vocab} is outside the model's vocabulary: "
                                           rf"token ids must lie in \[0, {vocab - 1}\]"):
        engine.add_request("r", [1, 2, vocab, -1], greedy(2))


def test_files_are_checked_before_the_model_loads(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "x", "max_tokens": 1}])
    no_model = ["--model", str(tmp_path / "no-such-model")]  # a model error would show if files came second
    cases = [(["--input", str(src), "--output", str(tmp_path)], "--output"),
             (["--input", str(src), "--output", str(tmp_path / "missing" / "out.jsonl")], "--output"),
             (["--input", str(src), "--output", str(src)], "is the --input file"),
             (["--input", str(tmp_path), "--output", str(out)], "--input"),
             (["--input", str(tmp_path / "none.jsonl"), "--output", str(out)], "--input")]
    for args, needle in cases:
        assert main(["generate", *args, *no_model]) == 2
        err = capsys.readouterr().err
        assert needle in err and "no-such-model" not in err and "Traceback" not in err, err
    assert json.loads(src.read_text())["prompt"] == "x"  # the input was not overwritten
    out.write_text("earlier results\n")
    assert main(["generate", "--input", str(src), "--output", str(out), *no_model]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"  # a failed start leaves an existing output as it was


def test_an_unwritable_special_output_is_a_clear_error(tmp_path, capsys):
    import os

    import pytest

    if not os.path.exists("/proc/version"):
        pytest.skip("needs Linux /proc")
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "x", "max_tokens": 1}])
    assert run_cli(["generate", "--input", str(src), "--output", "/proc/version", *SMALL_ENGINE]) == 2
    err = capsys.readouterr().err
    assert "--output '/proc/version'" in err and "Traceback" not in err


def _serve(tmp_path, model_dir, lines, on_step):
    """run_generate on a fresh engine whose every step is followed by on_step(engine, output text)."""
    import io

    from batchdeck.engine.service.generate import generate_files, run_generate
    from tests.helpers import make_engine

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, lines)
    engine = make_engine(model_dir, num_blocks=128, block_size=4, max_num_seqs=4)
    step = engine.step

    def watched_step():
        result = step()
        on_step(engine, out.read_text())
        return result

    engine.step = watched_step
    errors = io.StringIO()
    with generate_files(str(src), str(out)) as (f_in, f_out):
        rc = run_generate(engine, f_in, f_out, input_name="in.jsonl", output_name=str(out), errors=errors)
    return rc, [json.loads(l) for l in out.read_text().splitlines()], errors.getvalue()


def test_results_are_written_in_input_order_as_they_finish(tmp_path, model_dirs):
    lines = [{"id": "a", "prompt_token_ids": [1, 2], "max_tokens": 2, "ignore_eos": True},
             {"id": "b", "prompt_token_ids": [3, 4], "max_tokens": 30, "ignore_eos": True},
             {"id": "c", "prompt_token_ids": [5, 6], "max_tokens": 2, "ignore_eos": True}]
    seen = []

    def on_step(engine, text):
        ids = [json.loads(l)["id"] for l in text.splitlines()]
        seen.append((ids, engine.requests["b"].is_finished, engine.requests["c"].is_finished))

    rc, rows, _ = _serve(tmp_path, model_dirs["llama"], lines, on_step)
    assert rc == 0 and [r["id"] for r in rows] == ["a", "b", "c"]
    # "a" was on disk while "b" still ran; "c" finished early but waited for "b" (input order)
    assert (["a"], False, True) in seen


def test_an_interrupted_run_keeps_what_finished(tmp_path, model_dirs):
    lines = [{"id": "a", "prompt_token_ids": [1, 2], "max_tokens": 2, "ignore_eos": True},
             {"id": "b", "prompt_token_ids": [3, 4], "max_tokens": 60, "ignore_eos": True},
             {"id": "c", "prompt_token_ids": [5, 6], "max_tokens": 3, "ignore_eos": True}]

    def on_step(engine, text):
        if engine.requests["c"].is_finished:
            raise KeyboardInterrupt

    rc, rows, err = _serve(tmp_path, model_dirs["llama"], lines, on_step)
    assert rc == 130 and [r["id"] for r in rows] == ["a", "c"]
    assert "interrupted: 2 finished result(s) written" in err and "1 request(s) not finished" in err


# -- hub ids (issue 18 item 12) ----------------------------------------------------------------------

def test_generate_with_a_hub_id_from_the_local_cache(tmp_path, monkeypatch, capsys):
    import socket

    from tests.helpers import fake_hub_cache

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "acme/Tiny-0.1B")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "a", "prompt_token_ids": [1, 2, 3], "max_tokens": 3, "ignore_eos": True}])
    assert main(["generate", "--model", "acme/Tiny-0.1B", "--input", str(src), "--output", str(out),
                 *SMALL_ENGINE]) == 0
    assert len(json.loads(out.read_text())["output_token_ids"]) == 3
    assert main(["generate", "--model", "Qwen/Qwen3-0.6B", "--input", str(src), "--output", str(out),
                 *SMALL_ENGINE]) == 2
    err = capsys.readouterr().err
    assert "'Qwen/Qwen3-0.6B' is not a local directory and not in the local Hugging Face cache" in err
    assert str(tmp_path / "hub") in err and "--model /models/Qwen3-0.6B" in err and "Traceback" not in err


def test_generate_imports_no_server_console_or_mqtt_stack(tmp_path):
    """`batchdeck generate` (the start-up path of a short job) loads neither the HTTP server, the
    console nor the MQTT client."""
    import json
    import subprocess
    import sys

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "max_tokens": 2}) + "\n")
    code = ("import json, sys\nfrom batchdeck.cli import main\n"
            f"rc = main(['generate', '--input', {str(src)!r}, '--output', {str(dst)!r}, '--model', 'synthetic:tiny'])\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = {"fastapi", "starlette", "uvicorn", "textual", "textual_plotext", "aiomqtt", "paho", "prometheus_client",
             "openai", "matplotlib"}
    assert not loaded & heavy, f"generate imported {sorted(loaded & heavy)}"
    assert dst.read_text().count("\n") == 1


def test_the_command_line_defers_transformers_modeling_until_a_model_loads():
    """`transformers.modeling_utils` (seconds of imports) is paid by loading a model, not by
    `batchdeck --help`, the console's process or a simulated run."""
    import subprocess
    import sys

    code = ("import sys, batchdeck.cli, batchdeck.engine.llm_engine\n"
            "print(sorted(m for m in ('transformers.modeling_utils', 'torch._dynamo', 'sympy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_finished_request_id_is_refused_saying_why(model_dirs):
    import pytest

    from batchdeck.engine.request import RequestError
    from tests.helpers import greedy, make_engine

    engine = make_engine(model_dirs["llama"], num_blocks=64)
    engine.add_request("r", [1, 2], greedy(1))
    engine.run_until_done()
    with pytest.raises(RequestError, match=r"request id 'r' belongs to a finished request: .* last 10,000 finished"):
        engine.add_request("r", [1, 2], greedy(1))
