import pytest
import torch

# Tiny models: one intra-op thread is faster and steadier than several on a small machine.
torch.set_num_threads(1)

from tests.helpers import save_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {t: save_tiny_model(t, str(root / t)) for t in ("llama", "qwen2", "qwen3", "mistral")}
