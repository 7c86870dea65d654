import pytest
import torch

from batchdeck.engine.request import SamplingParams
from batchdeck.engine.sampler import Sampler
from tests.helpers import make_engine


def sample(sampler: Sampler, logits, request_ids, params) -> list[int]:
    return sampler.sample_ids(logits, request_ids, params)[0].tolist()


def test_seeded_sampling_reproducible_across_batch_compositions(model_dirs):
    path = model_dirs["qwen3"]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    def run(extra_requests, max_num_seqs):
        e = make_engine(path, max_num_seqs=max_num_seqs, max_batched_tokens=32, chunk_size=8)
        for i in range(extra_requests):
            e.add_request(f"x{i}", [5 + i] * (3 + i), SamplingParams(max_tokens=7, temperature=0.7, ignore_eos=True))
        e.add_request("target", [1, 2, 3, 4, 5], params)
        e.run_until_done()
        return e.requests["target"].output_token_ids

    alone = run(0, 1)
    assert run(3, 4) == alone
    assert run(5, 2) == alone


def test_unseeded_sampling_varies_and_greedy_rows_stay_greedy():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(2, 50)
    p_greedy = SamplingParams(temperature=0.0)
    p_hot = SamplingParams(temperature=5.0)
    draws = {tuple(sample(sampler, logits, ["g", "h"], [p_greedy, p_hot])) for _ in range(30)}
    assert {d[0] for d in draws} == {int(logits[0].argmax())}
    assert len({d[1] for d in draws}) > 3


def test_sample_ids_returns_the_log_probabilities_of_the_rows_that_ask_each_call_its_own():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 0.0, 4.0], [2.0, 2.0, 0.0, 0.0]])
    params = [SamplingParams(logprobs=True), SamplingParams(), SamplingParams(temperature=0.5, logprobs=True)]
    ids, logprobs, tops = sampler.sample_ids(logits, ["a", "b", "c"], params)
    want = torch.log_softmax(logits, dim=-1)  # the model's distribution, before temperature
    assert set(logprobs) == {"a", "c"} and ids.tolist()[0] == 1 and tops == {}
    for row, rid in ((0, "a"), (2, "c")):
        assert abs(logprobs[rid] - float(want[row, ids[row]])) < 1e-6
    _, later, _ = sampler.sample_ids(logits[1:2], ["b"], [SamplingParams(logprobs=True)])
    assert set(later) == {"b"} and set(logprobs) == {"a", "c"}  # a launched step's dict is never changed later


def test_top_logprobs_are_the_most_likely_tokens_of_each_row_that_asks_how_many_it_asks():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 0.5, 4.0], [2.0, 2.5, 0.1, 0.0]])
    params = [SamplingParams(logprobs=True, top_logprobs=2), SamplingParams(logprobs=True),
              SamplingParams(temperature=0.5, logprobs=True, top_logprobs=4)]
    _, logprobs, tops = sampler.sample_ids(logits, ["a", "b", "c"], params)
    want = torch.log_softmax(logits, dim=-1)
    assert set(logprobs) == {"a", "b", "c"} and set(tops) == {"a", "c"}
    assert [t for t, _ in tops["a"]] == [1, 2] and [t for t, _ in tops["c"]] == [1, 0, 2, 3]
    for row, rid in ((0, "a"), (2, "c")):
        for token, value in tops[rid]:
            assert abs(value - float(want[row, token])) < 1e-6  # before temperature, as the sampled token's


def test_top_logprobs_need_logprobs_and_stay_in_range():
    from batchdeck.engine.request import RequestError

    with pytest.raises(RequestError, match="top_logprobs = 2 needs logprobs on"):
        SamplingParams(top_logprobs=2).validate()
    with pytest.raises(RequestError, match=r"top_logprobs must be an integer in \[0, 20\], got 21"):
        SamplingParams(logprobs=True, top_logprobs=21).validate()


def test_top_k_one_is_greedy_and_top_p_restricts():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    for _ in range(20):
        assert sample(sampler, logits, ["a"], [SamplingParams(temperature=1.0, top_k=1)]) == [1]
        assert sample(sampler, logits, ["a"], [SamplingParams(temperature=1.0, top_p=0.5)]) == [1]
    seen = {sample(sampler, logits, ["a"], [SamplingParams(temperature=1.0, top_k=2)])[0] for _ in range(60)}
    assert seen == {1, 2}


def test_eos_and_stop_tokens_stop(model_dirs):
    e = make_engine(model_dirs["llama"])
    first = e.add_request("probe", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    e.run_until_done()
    tok = first.output_token_ids[1]
    r = e.add_request("stop", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=(tok,), ignore_eos=True))
    e.run_until_done()
    assert r.output_token_ids == first.output_token_ids[:2] and r.finish_reason.value == "stop"


def test_out_of_range_seed_is_refused_up_front():
    import pytest

    from batchdeck.engine.request import RequestError

    with pytest.raises(RequestError, match="seed must be an integer"):
        SamplingParams(temperature=1.0, seed=2**64).validate()


def test_a_temperature_too_small_for_float32_samples_greedily():
    """1e-300 rounds to 0 in float32 and logits / 0 is NaN: such temperatures (below 1e-5) are greedy."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 0.5, 4.0]])
    for t in (1e-300, 1e-39, 9e-6):
        params = [SamplingParams(temperature=t, seed=1), SamplingParams(temperature=1.0)]
        assert params[0].greedy and not params[1].greedy
        assert sample(sampler, logits, ["a", "b"], params)[0] == 1
        probs = Sampler._filtered_probs(logits, params)
        assert torch.isfinite(probs).all()
    assert not SamplingParams(temperature=1e-5).greedy
