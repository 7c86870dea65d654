import textwrap

import pytest
import torch

# Tiny models: one intra-op thread is faster and steadier than several on a small machine.
torch.set_num_threads(1)

from batchdeck.presets import load_preset
from tests.helpers import save_tiny_model, save_tiny_profile


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {t: save_tiny_model(t, str(root / t)) for t in ("llama", "qwen2", "qwen3", "mistral")}


@pytest.fixture
def paced_preset(tmp_path):
    """A saturating load on a simulated engine: thousands of iterations in a few seconds of wall time."""
    profile = tmp_path / "tiny-profile.json"
    save_tiny_profile(profile)
    path = tmp_path / "kept.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: kept
        description: enough iterations for several refreezes
        model: synthetic:tiny
        engine: {{sim: {profile}}}
        config: {{policy: fcfs, max_num_seqs: 8, max_batched_tokens: 1024, chunk_size: 256}}
        workload:
          - kind: poisson
            rate: 200
            duration: 1.5
            input_tokens: {{dist: uniform, min: 16, max: 64}}
            output_tokens: {{dist: uniform, min: 48, max: 96}}
        timeline: []
        seed: 5
        """))
    return load_preset(path)
