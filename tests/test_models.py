import pytest
from transformers import AutoConfig

from batchdeck.engine.models import SYNTHETIC_SHAPES, ModelError, load_model, synthetic_config
from batchdeck.engine.tokenizer import ByteTokenizer
from tests.helpers import fake_hub_cache


def test_synthetic_shapes_have_the_real_dimensions():
    q = synthetic_config("qwen3-0.6b")
    assert (q.model_type, q.hidden_size, q.num_hidden_layers, q.num_key_value_heads, q.vocab_size) == (
        "qwen3", 1024, 28, 8, 151936)
    l8 = synthetic_config("llama-3.1-8b")
    assert (l8.hidden_size, l8.intermediate_size, l8.num_hidden_layers, l8.vocab_size) == (4096, 14336, 32, 128256)
    l1 = synthetic_config("llama-3.2-1b")
    assert (l1.hidden_size, l1.num_hidden_layers, l1.head_dim) == (2048, 16, 64)
    assert {"tiny", "qwen3-0.6b", "llama-3.2-1b", "llama-3.1-8b"} <= set(SYNTHETIC_SHAPES)


def test_synthetic_weights_are_seeded():
    a = load_model("synthetic:tiny", seed=3).model.lm_head.weight
    b = load_model("synthetic:tiny", seed=3).model.lm_head.weight
    c = load_model("synthetic:tiny", seed=4).model.lm_head.weight
    assert a.equal(b) and not a.equal(c)


@pytest.mark.parametrize("model_type,cls_name", [("bloom", "BloomForCausalLM"), ("mamba", "MambaForCausalLM")])
def test_unsupported_architecture_is_named_at_load(tmp_path, model_type, cls_name):
    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=cls_name):
        load_model(str(tmp_path))


def test_non_causal_lm_and_missing_dir(tmp_path):
    AutoConfig.for_model("t5").save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'t5' is not a causal LM"):
        load_model(str(tmp_path))
    weightless = tmp_path / "weightless"
    AutoConfig.for_model("llama").save_pretrained(weightless)
    with pytest.raises(ModelError, match="could not be loaded"):
        load_model(str(weightless))
    with pytest.raises(ModelError, match="neither synthetic"):
        load_model(str(tmp_path / "missing"))


def test_byte_tokenizer_round_trip_and_foreign_ids():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo, world")) == "héllo, world"
    text = tok.decode([1000, 257, 65])
    assert text.endswith("A") and len(text) == 2  # EOS dropped, a foreign id becomes printable


# -- end of sequence: the model's own configs (issue: a directory without a tokenizer stopped at 257) ----

def _model_without_eos(path, first_token_is=None):
    """A tiny llama saved with no EOS in its config and no tokenizer; optionally with lm_head rigged so
    that greedy decoding of PROMPT samples `first_token_is` first."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers import TINY

    cfg = AutoConfig.for_model("llama", **dict(TINY, eos_token_id=None, bos_token_id=None))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = None
    if first_token_is is not None:
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT])).logits[0, -1]
            top = int(logits.argmax())
            assert logits[top] > 0
            model.lm_head.weight[first_token_is] = 2 * model.lm_head.weight[top]
    model.save_pretrained(path)
    return str(path)


PROMPT = [5, 9, 14, 3]


def test_directory_without_tokenizer_or_eos_runs_to_max_tokens(tmp_path):
    from batchdeck.engine.config import EngineConfig, LiveConfig
    from batchdeck.engine.llm_engine import LLMEngine
    from batchdeck.engine.request import SamplingParams
    from batchdeck.engine.tokenizer import BYTE_EOS
    from tests.helpers import reference_tokens

    path = _model_without_eos(tmp_path / "no-eos", first_token_is=BYTE_EOS)
    reference = reference_tokens(path, tuple(PROMPT), 6)
    assert reference[0] == BYTE_EOS and len(reference) == 6  # transformers' generate() does not stop at 257
    loaded = load_model(path)
    assert loaded.eos_token_ids == () and loaded.tokenizer.eos_token_id is None
    engine = LLMEngine(EngineConfig(model=path, num_blocks=64, block_size=4), LiveConfig(), loaded=loaded)
    req = engine.add_request("r", PROMPT, SamplingParams(max_tokens=6))  # ignore_eos is off
    while engine.has_unfinished:
        engine.step()
    assert tuple(req.output_token_ids) == reference and req.finish_reason.value == "length"


def test_eos_comes_from_generation_config_then_config(tmp_path):
    from transformers import GenerationConfig

    path = _model_without_eos(tmp_path / "gen-eos")
    GenerationConfig(eos_token_id=[7, 11]).save_pretrained(path)
    assert load_model(path).eos_token_ids == (7, 11)
    assert load_model("synthetic:tiny").eos_token_ids == (257,)  # the byte tokenizer's EOS: synthetic models only


# -- hub ids from the local Hugging Face cache (never the network) -----------------------------------

@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def test_hub_id_resolves_from_hf_hub_cache(tmp_path, monkeypatch, no_network):
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/Tiny-0.1B")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("acme/Tiny-0.1B")
    assert loaded.name == "acme/Tiny-0.1B" and loaded.config.model_type == "qwen3"
    assert loaded.model.lm_head.weight.equal(load_model(snapshot).model.lm_head.weight)


def test_hub_id_resolves_from_hf_home(tmp_path, monkeypatch, no_network):
    fake_hub_cache(tmp_path / "home" / "hub", "acme/Tiny-0.1B")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert load_model("acme/Tiny-0.1B").config.model_type == "qwen3"


def test_uncached_hub_id_says_how_to_point_at_a_directory(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError) as err:
        load_model("Qwen/Qwen3-0.6B")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and str(tmp_path / "empty") in message
    assert "--model /models/Qwen3-0.6B" in message and "hf download Qwen/Qwen3-0.6B" in message
    with pytest.raises(ModelError, match="neither synthetic"):
        load_model("not a hub id!")
