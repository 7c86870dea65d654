"""Workload generation: determinism, arrival processes, length distributions, clamping, closed loop."""
from __future__ import annotations

import random
import statistics

from batchdeck.presets.workload_streams import (
    ClosedLoopStream,
    WorkloadItem,
    clamp_lengths,
    closed_loop_streams,
    count_clamped,
    generate_open_loop,
    sample_length,
)
from batchdeck.presets import BurstSpec, ClosedLoopSpec, GammaSpec, LengthDist, PoissonSpec, load_preset, shipped_presets

MAX_LEN = 4096
LOGNORMAL = LengthDist(dist="lognormal", mean=200, sigma=0.6, max=1000)


def mixed_streams():
    return [
        PoissonSpec(rate=5, duration=20, input_tokens=LOGNORMAL, output_tokens=LengthDist("uniform", min=4, max=32),
                    tenant="a"),
        GammaSpec(rate=2, cv=2, duration=20, input_tokens=64, output_tokens=8, tenant="b", slo_class="batch"),
        BurstSpec(at=3, count=5, input_tokens=LengthDist("normal", mean=100, std=30, min=10), output_tokens=16,
                  priority=2),
    ]


def test_same_seed_same_workload():
    assert generate_open_loop(mixed_streams(), 42, MAX_LEN) == generate_open_loop(mixed_streams(), 42, MAX_LEN)


def test_different_seeds_differ():
    a = generate_open_loop(mixed_streams(), 1, MAX_LEN)
    b = generate_open_loop(mixed_streams(), 2, MAX_LEN)
    assert [i.arrival for i in a] != [i.arrival for i in b]
    assert [i.prompt_token_ids for i in a] != [i.prompt_token_ids for i in b]


def test_items_sorted_tagged_and_token_ids_in_range():
    items = generate_open_loop(mixed_streams(), 0, MAX_LEN)
    assert [i.arrival for i in items] == sorted(i.arrival for i in items)
    assert {i.stream_index for i in items} == {0, 1, 2}
    for item in items:
        assert all(0 <= t <= 255 for t in item.prompt_token_ids)
        assert item.max_tokens >= 1 and item.num_prompt_tokens >= 1
        if item.stream_index == 1:
            assert (item.tenant, item.slo_class, item.num_prompt_tokens, item.max_tokens) == ("b", "batch", 64, 8)
        if item.stream_index == 2:
            assert item.priority == 2 and item.num_prompt_tokens >= 10


def test_other_streams_unchanged_when_one_stream_changes():
    base = mixed_streams()
    changed = [base[0], GammaSpec(rate=2, cv=2, duration=20, input_tokens=999, output_tokens=3), base[2]]
    a = [i for i in generate_open_loop(base, 5, MAX_LEN) if i.stream_index != 1]
    b = [i for i in generate_open_loop(changed, 5, MAX_LEN) if i.stream_index != 1]
    assert a == b


def test_poisson_mean_rate():
    spec = PoissonSpec(rate=10, duration=1000, input_tokens=1, output_tokens=1)
    items = generate_open_loop([spec], 123, MAX_LEN)
    # ~10,000 arrivals, standard deviation ~100: a 5% margin is 5 sigma.
    assert abs(len(items) / 1000 - 10) < 0.5
    assert all(0 < i.arrival < 1000 for i in items)
    gaps = [b.arrival - a.arrival for a, b in zip(items, items[1:])]
    assert abs(statistics.fmean(gaps) - 0.1) < 0.005
    assert abs(statistics.stdev(gaps) / statistics.fmean(gaps) - 1.0) < 0.05  # exponential: CV = 1


def test_count_gives_exactly_count():
    spec = PoissonSpec(rate=3, count=17, input_tokens=4, output_tokens=4)
    assert len(generate_open_loop([spec], 0, MAX_LEN)) == 17


def test_gamma_rate_and_cv():
    spec = GammaSpec(rate=5, cv=2, count=20000, input_tokens=1, output_tokens=1)
    arrivals = [0.0] + [i.arrival for i in generate_open_loop([spec], 9, MAX_LEN)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    mean = statistics.fmean(gaps)
    assert abs(mean - 0.2) < 0.02
    assert abs(statistics.stdev(gaps) / mean - 2.0) < 0.2


def test_burst_all_at_once():
    items = generate_open_loop([BurstSpec(at=7.5, count=12, input_tokens=16, output_tokens=4)], 0, MAX_LEN)
    assert len(items) == 12 and {i.arrival for i in items} == {7.5}


def test_lognormal_mean_is_the_distribution_mean():
    rng = random.Random(0)
    dist = LengthDist(dist="lognormal", mean=500, sigma=0.6)
    samples = [sample_length(dist, rng) for _ in range(20000)]
    assert abs(statistics.fmean(samples) - 500) < 15  # standard error ~2.3
    assert min(samples) >= 1


def test_other_length_dists():
    rng = random.Random(1)
    uniform = [sample_length(LengthDist("uniform", min=10, max=20), rng) for _ in range(2000)]
    assert min(uniform) == 10 and max(uniform) == 20
    normal = [sample_length(LengthDist("normal", mean=100, std=50, min=40, max=150), rng) for _ in range(2000)]
    assert min(normal) == 40 and max(normal) == 150 and 90 < statistics.fmean(normal) < 110
    assert sample_length(LengthDist("constant", value=33), rng) == 33
    assert sample_length(7, rng) == 7
    assert sample_length(LengthDist("normal", mean=1, std=10), rng) >= 1


def test_clamping_is_counted():
    spec = BurstSpec(count=4, input_tokens=200, output_tokens=50)
    items = generate_open_loop([spec], 0, 100)
    assert all(i.clamped for i in items) and count_clamped(items) == 4
    assert all(i.num_prompt_tokens == 99 and i.max_tokens == 1 for i in items)
    fits = generate_open_loop([BurstSpec(count=3, input_tokens=60, output_tokens=40)], 0, 100)
    assert count_clamped(fits) == 0
    assert clamp_lengths(90, 30, 100) == (90, 10, True)
    assert clamp_lengths(10, 10, 100) == (10, 10, False)


def test_closed_loop_streams_are_not_open_loop():
    streams = [ClosedLoopSpec(concurrency=2, count=4, input_tokens=8, output_tokens=8),
               BurstSpec(count=2, input_tokens=8, output_tokens=8)]
    assert {i.stream_index for i in generate_open_loop(streams, 0, MAX_LEN)} == {1}
    [loop] = closed_loop_streams(streams, 0, MAX_LEN)
    assert loop.stream_index == 0


def test_closed_loop_count():
    loop = ClosedLoopStream(ClosedLoopSpec(concurrency=3, count=5, input_tokens=8, output_tokens=4), 0, 1, MAX_LEN)
    first = loop.initial()
    assert len(first) == 3 and all(i.arrival == 0.0 for i in first)
    nxt = loop.on_finished(1.25)
    assert isinstance(nxt, WorkloadItem) and nxt.arrival == 1.25 and nxt.max_tokens == 4
    assert loop.on_finished(2.0) is not None
    assert loop.exhausted and loop.on_finished(3.0) is None and loop.issued == 5


def test_closed_loop_count_below_concurrency():
    loop = ClosedLoopStream(ClosedLoopSpec(concurrency=4, count=2, input_tokens=8, output_tokens=4), 0, 1, MAX_LEN)
    assert len(loop.initial()) == 2 and loop.on_finished(0.5) is None


def test_closed_loop_duration():
    spec = ClosedLoopSpec(concurrency=2, duration=10, input_tokens=LOGNORMAL, output_tokens=16)
    loop = ClosedLoopStream(spec, 0, 1, MAX_LEN)
    assert len(loop.initial()) == 2
    assert all(loop.on_finished(t) is not None for t in (1.0, 5.0, 9.99))
    assert loop.on_finished(10.0) is None and loop.on_finished(12.0) is None
    assert not loop.exhausted  # only count-bound streams know in advance


def test_closed_loop_deterministic():
    spec = ClosedLoopSpec(concurrency=2, count=6, input_tokens=LOGNORMAL, output_tokens=16)

    def run(seed):
        loop = ClosedLoopStream(spec, 3, seed, MAX_LEN)
        return loop.initial() + [loop.on_finished(float(t)) for t in range(4)]

    assert run(8) == run(8) and run(8) != run(9)
    assert {i.stream_index for i in run(8)} == {3}


def test_shipped_presets_generate_within_context():
    for path in shipped_presets().values():
        preset = load_preset(path)
        items = list(generate_open_loop(preset.workload, preset.seed, MAX_LEN))
        items += sorted((i for s in closed_loop_streams(preset.workload, preset.seed, MAX_LEN) for i in s.initial()),
                        key=lambda i: i.arrival)  # closed-loop and multi-turn streams' first requests
        assert items and all(i.num_prompt_tokens + i.max_tokens <= MAX_LEN for i in items)
        assert items[-1].arrival <= 60


class _FakeStream:
    finish_reason = "length"

    async def collect(self):
        return [1, 2]


class _FakeEngine:
    """Just what WorkloadPlayer touches of an AsyncEngine: the engine clock and add_request."""

    def __init__(self):
        import time
        from types import SimpleNamespace

        start = time.monotonic()
        self.engine = SimpleNamespace(clock=lambda: time.monotonic() - start, time_rate=1.0)
        self.added: list[tuple[str, float]] = []

    async def add_request(self, rid, prompt, sampling, *, arrival_time, **kw):
        self.added.append((rid, arrival_time))
        return _FakeStream()


async def test_the_player_repeats_with_fresh_ids_and_stamps_arrivals():
    import asyncio

    from batchdeck.presets.workload_player import WorkloadPlayer

    engine = _FakeEngine()
    items = [WorkloadItem(0.0, [1], 2, stream_index=0), WorkloadItem(0.05, [1], 2, stream_index=1)]
    player = WorkloadPlayer(engine, items, [], speed=2.0, repeat_every=0.1, id_prefix="r", keep_requests=False)
    task = asyncio.ensure_future(player.run(t0=0.0))
    deadline = asyncio.get_running_loop().time() + 30
    while len(engine.added) < 6 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    ids = [rid for rid, _ in engine.added]
    assert ids[:6] == ["r0-0", "r1-0", "r0-1", "r1-1", "r0-2", "r1-2"] and len(set(ids)) == len(ids)
    # pass k's arrival at t is stamped t0 + (k * 0.1 + t) / speed on the engine clock
    assert [round(a, 3) for _, a in engine.added[:6]] == [0.0, 0.025, 0.05, 0.075, 0.1, 0.125]
    assert player.requests == {} and player.submitted >= 6


async def test_the_player_keeps_each_request_when_asked_and_returns_at_the_end():
    from batchdeck.presets.workload_player import WorkloadPlayer

    engine = _FakeEngine()
    player = WorkloadPlayer(engine, [WorkloadItem(0.0, [1], 2, stream_index=3)], [])
    await player.run()
    assert list(player.requests) == ["3-0"] and player.requests["3-0"].token_ids == [1, 2]
    assert (player.submitted, player.finished, player.rejected) == (1, 1, 0)
