import pytest
from transformers import AutoConfig

from batchdeck.engine.models import SYNTHETIC_SHAPES, ModelError, load_model, synthetic_config
from batchdeck.engine.tokenizer import ByteTokenizer


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
