"""ITL and TPOT as vLLM users read them, from a real (tiny) engine run: ITL is every gap between
consecutive output tokens of a request (carried by the iteration that produced the later token),
TPOT is per request (e2e - TTFT) / (output tokens - 1)."""
import numpy as np
import pytest

from batchdeck.engine.service.metrics import summarize
from batchdeck.engine.telemetry import ListSink
from tests.helpers import greedy, make_engine


def test_itl_is_every_token_gap_and_tpot_is_per_request(model_dirs):
    sink = ListSink()
    engine = make_engine(model_dirs["llama"], sink=sink, max_num_seqs=3, max_batched_tokens=64, chunk_size=16)
    for i, (prompt, out) in enumerate([(40, 9), (5, 1), (20, 6), (12, 12)]):
        engine.add_request(f"r{i}", [3 + i] * prompt, greedy(out))
    engine.run_until_done()
    gaps = sorted(g for r in engine.requests.values() for g in np.diff(r.token_times))
    assert sorted(g for it in sink.iterations for g in it.itls) == pytest.approx(gaps)
    assert len(gaps) == 8 + 0 + 5 + 11  # output tokens minus one per request
    records = {rec.request_id: rec for rec in sink.requests}
    for rid, r in engine.requests.items():
        rec = records[rid]
        if r.num_output_tokens < 2:
            assert rec.tpot is None and rec.itl_max is None
            continue
        assert rec.tpot == pytest.approx((rec.e2e_latency - rec.ttft) / (rec.output_tokens - 1))
        assert rec.itl_max == pytest.approx(max(np.diff(r.token_times)))
    s = summarize(sink.iterations, sink.requests)
    assert s["inter_token_latency"]["p50"] == pytest.approx(float(np.percentile(gaps, 50)))
    assert s["inter_token_latency"]["mean"] == pytest.approx(float(np.mean(gaps)))
    assert s["inter_token_latency"]["max"] == pytest.approx(max(gaps))
    tpots = [rec.tpot for rec in sink.requests if rec.tpot is not None]
    assert len(tpots) == 3 and s["time_per_output_token"]["p99"] == pytest.approx(float(np.percentile(tpots, 99)))


def test_a_finish_imports_nothing_in_the_engine_thread():
    """np.percentile (a finished request's inter-token latencies) imports numpy.ma on its first call
    in a process, 8 ms: the engine's module imports it, so the first finish does not stall on it."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, batchdeck.engine.llm_engine; before = set(sys.modules); "
            "np.percentile(np.array([1.0, 2.0]), (50, 99)); print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
