"""Pure pieces of speculative decoding: n-gram lookup and the rejection-sampling rule."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchdeck.engine.speculative.ngram import propose_ngram
from batchdeck.engine.speculative.rejection import verify_greedy, verify_sampled


def test_ngram_proposes_latest_match_continuation():
    toks = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_ngram(toks, 2) == [7, 8]  # latest earlier "1 2 3" is followed by 7 8
    assert propose_ngram([4, 5, 6], 3) == []
    assert propose_ngram([5, 5, 5, 5], 2) == [5, 5]  # the copy goes on past the end of the context
    assert propose_ngram([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # a loop of period 3


@given(st.lists(st.integers(0, 4), min_size=0, max_size=30), st.integers(0, 5))
def test_ngram_proposals_come_from_the_context(toks, k):
    out = propose_ngram(toks, k)
    assert len(out) <= k
    if out:  # some earlier position p follows a token equal to the last one, and out copies on from p
        assert len(out) == k
        extended = toks + out
        assert any(toks[p - 1] == toks[-1] and extended[p:p + len(out)] == out for p in range(1, len(toks)))
    elif k > 0 and len(toks) >= 2:
        assert toks[-1] not in toks[:-1]  # a 1-gram match always proposes something


def test_greedy_accepts_matching_prefix_then_target_token():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 9]) == [5, 6, 7]
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert verify_greedy([1, 2], [3]) == [1]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())


def _first_token_distribution(correct: bool, trials: int = 6000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = 5
    target = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]])
    draft_p = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.5]])
    counts = torch.zeros(vocab)
    for _ in range(trials):
        d = int(torch.multinomial(draft_p[0], 1, generator=gen))
        if correct:
            tok = verify_sampled(target, [d], draft_p, gen)[0]
        else:  # the broken rule: on rejection sample from the target, not the residual
            u = float(torch.rand(1, generator=gen))
            tok = d if u < min(1.0, float(target[0, d] / draft_p[0, d])) else int(
                torch.multinomial(target[0], 1, generator=gen))
        counts[tok] += 1
    return counts, target[0]


def test_rejection_sampling_keeps_the_target_distribution():
    counts, target = _first_token_distribution(correct=True)
    assert _chi_square(counts, target) < 18.47  # chi-square, 4 dof, p = 0.001


def test_broken_correction_is_detected_by_the_same_test():
    counts, target = _first_token_distribution(correct=False)
    assert _chi_square(counts, target) > 18.47
