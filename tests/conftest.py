import pytest

from tests.helpers import save_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {t: save_tiny_model(t, str(root / t)) for t in ("llama", "qwen2", "qwen3", "mistral")}
