"""benchmarks/sim_iteration_bias.py: recorded iterations priced by a profile, per regime and band."""
import gzip
import json

import pytest

from batchdeck.engine.sim.cost_model import CostModel, IterationShape
from benchmarks.sim_iteration_bias import bias_by_band, read_samples
from tests.helpers import TINY_SIM_COST as COST


def test_recorded_iterations_are_priced_per_band(tmp_path):
    model = CostModel(dict(COST))
    shapes = [IterationShape.of_rows([(100, 1)]), IterationShape.of_rows([(100, 1)] * 5),
              IterationShape.of_rows([(0, 200), (50, 1)]), IterationShape.of_rows([(0, 900), (50, 1)])]
    measured = [1.1 * model.predict(s) for s in shapes[:2]] + [0.5 * model.predict(s) for s in shapes[2:]]
    path = tmp_path / "samples.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for s, gap in zip(shapes, measured):
            row = {"gap_s": gap, **{k: getattr(s, k) for k in ("prefill_tokens", "prefill_attention", "decode_rows",
                                                               "decode_context", "prefill_rows", "decode_max_context")}}
            f.write(json.dumps(row) + "\n")  # a file written before prefill_max_context: read as 0
    samples = read_samples(str(path))
    assert [s for s, _ in samples][:2] == shapes[:2]
    table = bias_by_band(model, samples)
    assert set(table) == {"decode 1-2", "decode 3-8", "mixed small", "mixed other"}
    assert table["decode 1-2"]["bias"] == pytest.approx(1 / 1.1 - 1)
    assert table["mixed other"]["bias"] == pytest.approx(1.0) and table["mixed small"]["samples"] == 1
