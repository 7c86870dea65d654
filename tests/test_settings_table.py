"""The settings table is the one source: every setting reaches every command's flags, the retained config,
the console's palette, replay's --set, and a live change is refused with the same message on every path."""
from __future__ import annotations

import json

import pytest

from batchdeck.cli import build_parser, main
from batchdeck.console.commands import PANEL_SETTINGS, candidates, validate
from batchdeck.engine.config import ConfigBounds, ConfigError, EngineConfig, LiveConfig, resolve_configs, validate_changes
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.service.async_engine import AsyncEngine
from batchdeck.engine.service.control import ControlHandler
from batchdeck.engine.service.flags import engine_configs, given_engine_flags
from batchdeck.engine.settings import BY_NAME, LIMITS, LIVE_SETTINGS, SETTINGS, START_SETTINGS, Setting, defaults_for
from batchdeck.policies import policy_names, validate_policy_params

COMMANDS = {  # the arguments each engine-starting command needs besides the flag under test
    "generate": ["generate", "--input", "in.jsonl", "--output", "out.jsonl"],
    "engine": ["engine", "--preset", "quickstart"],
    "console": ["console"],
    "replay": ["replay", "quickstart"],
}
SAMPLE = {"model": "synthetic:tiny", "device": "cpu", "num_blocks": 512, "max_model_len": 256, "max_waiting": 100,
          "draft_model": "synthetic:tiny", "drafter": "model", "policy": "sjf", "policy_params": {"aging_s": 5},
          "mixing": "selective", "batching": "static", "preemption": "drain", "max_num_seqs": 4,
          "max_batched_tokens": 1024, "chunk_size": 64, "spec_k": 2, "cuda_graphs": False,
          "prefix_caching": False, "sim": "h200-qwen3-0.6b"}


def sample(s: Setting):
    """A valid value for `s` that differs from its default where possible."""
    if s.name in SAMPLE:
        return SAMPLE[s.name]
    if s.kind == "choice":
        return s.choice_list()[-1]
    if s.kind in ("int", "float"):
        return s.default + 1 if s.kind == "int" else s.default / 2 if s.default else 0.5
    return s.default


def as_text(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def flag_args(s: Setting, flag: str, value) -> list[str]:
    if s.kind == "bool":
        return [flag if value else "--no-" + flag[2:]]
    return [flag, as_text(value)]


def bad_value(s: Setting, bounds: ConfigBounds, live: dict):
    """A value the live setting `s` refuses: past its bound in force, an unknown name, or the wrong type."""
    if s.kind == "choice":
        return "bogus"
    if s.kind == "object":
        return 7
    if s.kind == "bool":
        return "maybe"
    high = bounds.upper(s.name, live)
    return high + 1


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", [s.name for s in SETTINGS])
def test_every_command_accepts_every_setting_flag(command, name):
    s = BY_NAME[name]
    assert s.flags, f"{name} has no flag"
    for flag in s.flags:  # aliases (vLLM's names) too
        args = build_parser().parse_args(COMMANDS[command] + flag_args(s, flag, sample(s)))
        assert given_engine_flags(args)[name] == sample(s), (command, flag)


def test_every_setting_reaches_the_configs_the_same_way_on_every_command():
    """All flags at once: each command resolves them to the same EngineConfig and LiveConfig."""
    from batchdeck.console.cli import inprocess_configs
    from batchdeck.engine.service.headless import engine_setup
    from batchdeck.presets.cli import overrides_from
    from batchdeck.presets.preset_driver import preset_configs
    from batchdeck.presets import load_preset, resolve_preset

    # --sim fixes the model, dtype and pool from its profile (tests/test_sim.py covers it on every command)
    together = [s for s in SETTINGS if s.name != "sim"]
    argv = [a for s in together for a in flag_args(s, s.flag, sample(s))]
    parser = build_parser()
    generate = engine_configs(parser.parse_args(COMMANDS["generate"] + argv))
    engine = engine_setup(parser.parse_args(COMMANDS["engine"] + argv))[:2]
    console = inprocess_configs(None, given_engine_flags(parser.parse_args(COMMANDS["console"] + argv)))
    replay_args = parser.parse_args(COMMANDS["replay"] + argv)
    replay = preset_configs(load_preset(resolve_preset("quickstart")), overrides_from(replay_args))
    assert generate == engine == console == replay
    cfg, live = generate
    for s in together:
        got = getattr(live if s.live else cfg, s.name)
        assert (dict(got) if s.kind == "object" else got) == sample(s), s.name


@pytest.mark.parametrize("command", ["generate", "engine", "console", "replay"])
def test_spec_k_raises_its_limit_on_every_command(command):
    """`--spec-k 12` raises spec_k_limit to 12 on every path (it stayed 8, and was refused, through the
    console, `engine --preset` and replay)."""
    from batchdeck.console.cli import inprocess_configs
    from batchdeck.engine.service.headless import engine_setup
    from batchdeck.presets.cli import overrides_from
    from batchdeck.presets.preset_driver import preset_configs
    from batchdeck.presets import load_preset, resolve_preset

    args = build_parser().parse_args(COMMANDS[command] + ["--spec-k", "12", "--device", "cpu"])
    if command == "generate":
        cfg, live = engine_configs(args)
    elif command == "engine":
        cfg, live, _ = engine_setup(args)
    elif command == "console":
        cfg, live = inprocess_configs(None, given_engine_flags(args))
        assert inprocess_configs(load_preset(resolve_preset("quickstart")), given_engine_flags(args))[0].spec_k_limit == 12
    else:
        cfg, live = preset_configs(load_preset(resolve_preset(args.preset)), overrides_from(args))
    assert (cfg.spec_k_limit, live.spec_k) == (12, 12)


def test_replay_set_accepts_every_setting(tmp_path):
    from batchdeck.presets.cli import overrides_from, prepare_preset
    from batchdeck.presets.preset_driver import preset_configs

    argv = ["replay", "quickstart"]
    together = [s for s in SETTINGS if s.name != "sim"]  # --sim fixes model, dtype and pool (tests/test_sim.py)
    for s in together:
        argv += ["--set", f"{s.name}={as_text(sample(s))}"]
    args = build_parser().parse_args(argv)
    preset = prepare_preset(args)
    cfg, live = preset_configs(preset, overrides_from(args))
    for s in together:
        got = getattr(live if s.live else cfg, s.name)
        assert (dict(got) if s.kind == "object" else got) == sample(s), s.name
    with pytest.raises(ValueError, match="--set: bogus=1 is not allowed: a setting: model, device"):
        prepare_preset(build_parser().parse_args(["replay", "quickstart", "--set", "bogus=1"]))


@pytest.fixture(scope="module")
def tiny_engine():
    return LLMEngine(EngineConfig(model="synthetic:tiny", num_blocks=128))


def test_the_retained_config_carries_every_setting(tiny_engine):
    snap = json.loads(json.dumps(tiny_engine.config_snapshot()))  # as MQTT retains it
    for s in LIVE_SETTINGS:
        assert s.name in snap["config"] and s.name in snap["bounds"], s.name
    for s in START_SETTINGS:
        assert s.name in snap["engine"], s.name
    bounds = snap["bounds"]
    assert bounds["max_num_seqs"] == [1, 128] and bounds["limited_by"] == {"max_num_seqs": "num_blocks"}
    assert bounds["max_batched_tokens"] == [1, 8192] and bounds["chunk_size"] == [1, "max_batched_tokens"]
    assert bounds["spec_k"] == [0, 8] and bounds["policy"] == list(policy_names())
    assert bounds["policy_params"]["sjf"]["aging_s"]["low"] == 0
    assert ConfigBounds.from_dict(bounds) == tiny_engine.bounds  # the console reads back what the engine uses


def test_the_console_palette_offers_every_live_setting(tiny_engine):
    snap = tiny_engine.config_snapshot()
    offered = [c.text for c in candidates("", snap["config"], snap["bounds"])]
    for s in LIVE_SETTINGS:
        assert any(t.split()[0] == s.name for t in offered), s.name
        # the sample parameters are sjf's: the palette checks them against the live policy's published specs
        config = {**snap["config"], "policy": "sjf"} if s.name == "policy_params" else snap["config"]
        (typed,) = candidates(f"{s.name} {as_text(sample(s))}", config, snap["bounds"])
        assert typed.error is None and typed.changes == {s.name: sample(s)}, (s.name, typed)
    assert set(PANEL_SETTINGS) == {s.name for s in LIVE_SETTINGS} - {"policy_params"}


async def test_a_live_change_is_refused_with_the_same_message_on_every_path(model_dirs):
    """For each live setting: the engine, the in-process client, MQTT control and the console's own
    check all refuse a bad value with one message, the one `validate_changes` gives."""
    from batchdeck.console.inprocess_client import InProcessClient

    llm = LLMEngine(EngineConfig(model="synthetic:tiny", num_blocks=64), LiveConfig(max_batched_tokens=256))
    engine = AsyncEngine(llm)
    await engine.start()
    client = InProcessClient(engine, gpu_interval_s=None)
    handler = ControlHandler(engine)
    try:
        for s in LIVE_SETTINGS:
            snap = llm.config_snapshot()
            value = bad_value(s, llm.bounds, snap["config"])
            with pytest.raises(ConfigError) as info:
                validate_changes(llm.target_config, {s.name: value}, llm.bounds, validate_policy_params)
            want = str(info.value)
            assert s.name in want
            result = await client.set({s.name: value})
            assert (result.ok, result.error) == (False, want)
            reply = await handler.handle(json.dumps({"id": s.name, "op": "set", "params": {s.name: value}}))
            assert (reply["ok"], reply["error"]) == (False, want)
            assert validate({s.name: value}, snap["config"], snap["bounds"]) == want
            (c,) = candidates(f"{s.name} {as_text(value)}", snap["config"], snap["bounds"])
            assert c.error == want or s.kind == "object", (s.name, c)  # a JSON 7 is refused before (not an object)
        assert llm.target_config.version == 0  # nothing applied
        ok = await client.set({"max_batched_tokens": 512})
        assert ok.ok
        reply = await handler.handle(json.dumps({"id": "x", "op": "set", "params": {"chunk_size": 9999}}))
        assert reply["error"] == "chunk_size=9999 is not allowed: an integer in [1, 512] (the live max_batched_tokens)"
    finally:
        await engine.stop()


# -- per-device defaults ---------------------------------------------------------------------------
def test_cuda_starts_gpu_sized_and_cpu_stays_small():
    cfg, live = resolve_configs({}, cuda_available=True)
    assert (cfg.device, cfg.dtype, cfg.num_blocks) == ("cuda", "bfloat16", None)  # the pool from free memory
    assert (live.max_num_seqs, live.max_batched_tokens, live.chunk_size) == (256, 8192, 2048)
    # the CUDA graphs are captured up to the limits, which cover the defaults
    assert (cfg.max_num_seqs_limit, cfg.max_batched_tokens_limit) == (256, 8192)  # no more capture than before
    cfg, live = resolve_configs({}, cuda_available=False)
    assert (cfg.device, cfg.dtype) == ("cpu", "float32")
    assert (live.max_num_seqs, live.max_batched_tokens, live.chunk_size) == (8, 512, 256)
    assert (cfg.max_num_seqs_limit, cfg.max_batched_tokens_limit) == (256, 8192)
    # a sizing flag given on CUDA wins; an unset limit is raised to fit it
    cfg, live = resolve_configs({"max_num_seqs": 1024, "max_batched_tokens": 1024}, cuda_available=True)
    assert (live.max_num_seqs, cfg.max_num_seqs_limit, live.chunk_size) == (1024, 1024, 1024)
    assert defaults_for("cuda:1")["max_num_seqs"] == 256


def test_help_shows_both_defaults_and_the_registries_choices(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 8 on cpu, 256 on cuda" in text and "default: 512 on cpu, 8192 on cuda" in text
    assert "default: float32 on cpu, bfloat16 on cuda" in text
    assert "{" + ",".join(policy_names()) + "}" in text
    assert "{stall-free,prefill-first,selective}" in text and "{ngram,model}" in text
    assert "--max-num-batched-tokens" in text and "--scheduling-policy" in text
    assert "--enable-chunked-prefill" in text and "chunked prefill is always on" in text


# -- the command line ------------------------------------------------------------------------------
def test_vllm_aliases_mean_the_same():
    args = build_parser().parse_args(COMMANDS["generate"] + ["--max-num-batched-tokens", "1024", "--scheduling-policy",
                                                             "priority", "--enable-chunked-prefill", "--device", "cpu"])
    cfg, live = engine_configs(args)
    assert (live.max_batched_tokens, live.policy) == (1024, "priority")


@pytest.mark.parametrize("argv, usage, hint", [
    (["generate", "--input", "a", "--output", "b", "--max-num-seq", "4"], "usage: batchdeck generate",
     "--max-num-seq: did you mean --max-num-seqs?"),
    (["console", "--chunk-sz", "4"], "usage: batchdeck console", "did you mean --chunk-size?"),
    (["replay", "quickstart", "--headles"], "usage: batchdeck replay", "did you mean --headless?"),
    (["engine", "--max-num-batched=4"], "usage: batchdeck engine", "did you mean --max-num-batched-tokens?"),
    # a typo beside missing required flags: the typo is named first
    (["generate", "--max-num-seq", "4"], "usage: batchdeck generate", "--max-num-seq: did you mean --max-num-seqs?"),
    (["generate", "--inptu", "a", "--output", "b"], "usage: batchdeck generate", "--inptu: did you mean --input?"),
])
def test_no_prefix_matching_and_a_near_miss_names_the_closest_flag(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and usage in err and hint in err, err


def test_missing_required_flags_are_still_named(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["generate", "--max-num-seqs", "4"])
    assert info.value.code == 2 and "the following arguments are required: --input, --output" in capsys.readouterr().err
    parser = build_parser()
    args = parser.parse_args(["generate", "--input", "a", "--output", "b"])
    assert (args.input, args.output) == ("a", "b")
    with pytest.raises(SystemExit):  # the relaxed first pass left them required for the next parse
        parser.parse_args(["generate", "--output", "b"])
    assert "the following arguments are required: --input" in capsys.readouterr().err


def write_input(tmp_path) -> tuple[str, str]:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hello", "max_tokens": 2}) + "\n")
    return str(src), str(tmp_path / "out.jsonl")


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    src, out = write_input(tmp_path)
    assert main(["generate", "--input", src, "--output", out, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: device='cuda' is not allowed: cpu: torch finds no CUDA device" in err
    with pytest.raises(ConfigError, match="no CUDA device"):
        LLMEngine(EngineConfig(device="cuda"))


def test_a_pool_larger_than_memory_is_refused_before_allocating(tmp_path, capsys):
    src, out = write_input(tmp_path)
    assert main(["generate", "--input", src, "--output", out, "--device", "cpu", "--num-blocks", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "--num-blocks 100000000: num_blocks=100000000 is not allowed: at most" in err
    assert "GB" in err and "of cpu memory is available" in err


def test_num_blocks_names_the_bound_it_implies(tmp_path, capsys):
    src, out = write_input(tmp_path)
    assert main(["generate", "--input", src, "--output", out, "--device", "cpu", "--num-blocks", "7"]) == 2
    err = capsys.readouterr().err
    assert "max_num_seqs=8 is not allowed" not in err
    assert "--num-blocks 7: num_blocks=7 is not allowed: at least 8: each running request holds at least one KV " \
           "block and max_num_seqs is 8 by default on cpu; give --num-blocks 8 or more, or --max-num-seqs 7 or less" in err
    assert main(["generate", "--input", src, "--output", out, "--device", "cpu", "--num-blocks", "7",
                 "--max-num-seqs", "7"]) == 0
    assert main(["generate", "--input", src, "--output", out, "--device", "cpu", "--num-blocks", "7",
                 "--max-num-seqs", "9"]) == 2
    assert "--max-num-seqs 9: max_num_seqs=9 is not allowed: an integer in [1, 7] (--num-blocks 7: the KV pool " \
           "has 7 blocks" in capsys.readouterr().err


def test_a_value_past_a_limits_ceiling_names_it():
    with pytest.raises(ConfigError, match=r"max_batched_tokens=100000 is not allowed: an integer in \[1, 65536\] "
                                          r"\(max_batched_tokens_limit goes up to 65536\)"):
        resolve_configs({"max_batched_tokens": 100000}, cuda_available=False)
    with pytest.raises(ConfigError, match=r"spec_k=9 is not allowed: an integer in \[0, 4\] \(spec_k_limit, fixed"):
        resolve_configs({"spec_k": 9, "spec_k_limit": 4}, cuda_available=False)


def test_the_table_is_whole():
    """Every setting has a meaning, a flag, a default that passes its own check on both devices, and a
    bound that names a real setting; the limits bound live settings."""
    for s in SETTINGS:
        assert s.meaning and s.flags and s.flag == "--" + s.name.replace("_", "-")
        for device in ("cpu", "cuda"):
            default = s.default_for(device)
            if default is not None and s.bound_ref is None:
                s.check(default)
        if s.bound_ref:
            assert s.bound_ref in BY_NAME
    assert LIMITS == {"max_num_seqs": "max_num_seqs_limit", "max_batched_tokens": "max_batched_tokens_limit",
                      "spec_k": "spec_k_limit"}
