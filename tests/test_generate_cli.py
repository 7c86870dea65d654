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
