"""The collector's freeze: counted holds, refreezing only under a hold, and a replay that freezes the
records it keeps as they accumulate (serving, and a replay on a borrowed engine, never refreeze)."""
from __future__ import annotations

import gc

import pytest

from batchdeck.engine.service import heap_freeze
from batchdeck.engine.service.heap_freeze import RetainedFreezer
from batchdeck.engine.sim.clock import PacedClock
from tests.helpers import fail_steps

EVERY = RetainedFreezer().every  # the default step, which replays use


@pytest.fixture(autouse=True)
def no_hold_left():
    assert heap_freeze.holders() == 0, "an earlier test left an engine holding the freeze"
    assert gc.get_freeze_count() == 0
    yield
    assert heap_freeze.holders() == 0
    assert gc.get_freeze_count() == 0


class HeapSamples:
    """A replay's `progress` callback: per sample, how many iteration records were kept, how many of
    them the collector would walk (not frozen), and how many of those were kept more than `EVERY`
    records ago, and the frozen set's size."""

    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def __call__(self, driver) -> None:
        records = list(self.telemetry(driver).iterations)
        tracked = {id(o) for o in gc.get_objects()}
        unfrozen = [id(r) in tracked for r in records]
        self.rows.append((len(records), sum(unfrozen), sum(unfrozen[:-EVERY]), gc.get_freeze_count()))

    @staticmethod
    def telemetry(driver):
        from batchdeck.engine.telemetry import ListSink

        sinks = [driver.engine.engine.sink]
        while sinks:  # a borrowed engine's sink is Tee(previous, Tee(ListSink, ...))
            s = sinks.pop(0)
            if isinstance(s, ListSink):
                return s
            sinks.extend(getattr(s, "sinks", []))
        raise AssertionError("no ListSink in the replay's sinks")


def _tracked(obj) -> bool:
    """Whether the collector walks `obj` (frozen objects are left out of `gc.get_objects()`)."""
    return any(o is obj for o in gc.get_objects())


def test_holds_are_counted_and_only_the_last_release_unfreezes():
    """Checked by identity, not by `gc.get_freeze_count()`: frozen objects freed by reference counting
    (another test's thread ending, say) lower the count at any time."""
    assert not heap_freeze.refreeze()  # no hold: nothing is frozen
    assert gc.get_freeze_count() == 0
    held = 0
    before = [0]  # tracked, alive at the first hold
    try:
        heap_freeze.hold()
        held += 1
        assert gc.get_freeze_count() > 1000  # the imported modules, at least
        assert not _tracked(before)
        between = [1]  # created after the first hold
        heap_freeze.hold()
        held += 1
        assert _tracked(between)  # one freeze for the process, not one per holder
        made = [[i] for i in range(5000)]  # tracked, kept
        assert heap_freeze.refreeze()
        assert not _tracked(between) and not _tracked(made) and not _tracked(made[-1])
        heap_freeze.release()
        held -= 1
        assert not _tracked(made[0])  # another holder remains: still frozen
    finally:
        for _ in range(held):
            heap_freeze.release()
    assert _tracked(made[0]) and _tracked(before)
    with pytest.raises(RuntimeError, match="no hold to release"):
        heap_freeze.release()


def test_retained_freezer_refreezes_every_n_records_only_under_a_hold(monkeypatch):
    calls = []
    monkeypatch.setattr(heap_freeze, "refreeze", lambda: calls.append(1) or bool(heap_freeze.holders()))
    freezer = RetainedFreezer(every=3)
    for _ in range(7):
        freezer("iteration", None)
    assert len(calls) == 2 and freezer.refreezes == 0  # called at 3 and 6; nothing held, nothing frozen
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        RetainedFreezer(every=0)


def test_a_replay_freezes_what_it_keeps_as_it_grows_and_unfreezes_at_the_end(paced_preset):
    from batchdeck.presets.replay import run_preset

    samples = HeapSamples()
    result = run_preset(paced_preset, clock=PacedClock(20.0), progress=samples, progress_interval=0.02)
    assert result.error is None
    freezer = next((s for s in result.driver.engine.engine.sink.sinks if isinstance(s, RetainedFreezer)), None)
    assert freezer is not None, "the replay keeps its records without a RetainedFreezer"
    assert freezer.records >= 3 * EVERY, "too few records to see the refreezes: lengthen the workload"
    assert freezer.refreezes == freezer.records // EVERY
    during = [row for row in samples.rows if row[3] > 0]  # sampled while the engine held the freeze
    assert max(kept for kept, *_ in during) >= 2 * EVERY
    # every iteration record followed by EVERY more records had been frozen by then (refreeze at each
    # EVERY-th record), so a full collection walked at most the last EVERY of them
    assert [old for _, _, old, _ in during] == [0] * len(during)
    assert max(unfrozen for _, unfrozen, _, _ in during) <= EVERY
    assert during[-1][3] - during[0][3] >= during[-1][0] - during[0][0]  # the frozen set grew with them


def test_a_failing_or_aborted_replay_still_gives_the_freeze_back(paced_preset):
    from batchdeck.presets.replay import run_preset

    def fail_late(driver):
        llm = driver.engine.engine
        fail_steps(llm, lambda: llm.iteration >= EVERY + 200, "boom")

    broken = run_preset(paced_preset, clock=PacedClock(20.0), on_start=fail_late)
    assert broken.error == "RuntimeError: boom"
    freezer = next((s for s in broken.driver.engine.engine.sink.sinks if isinstance(s, RetainedFreezer)), None)
    assert freezer is not None and freezer.refreezes >= 1  # it had refrozen before it failed (the fixture checks the release)

    def progress(driver):
        if driver.done:
            raise RuntimeError("display gone")  # at the very end, while the engine is still running

    with pytest.raises(RuntimeError, match="display gone"):
        run_preset(paced_preset, clock=PacedClock(20.0), duration_scale=0.2, progress=progress)


async def test_serving_and_a_replay_on_a_borrowed_engine_never_refreeze(paced_preset):
    """The console's replay drives its long-running engine: only the start-up freeze, so the unfrozen heap
    grows with the records while the frozen set does not."""
    from batchdeck.engine.service.async_engine import AsyncEngine
    from batchdeck.presets.preset_driver import build_engine_for_preset
    from batchdeck.presets.replay import run_preset_async

    engine = AsyncEngine(build_engine_for_preset(paced_preset, clock=PacedClock(20.0)))
    await engine.start()
    try:
        start_up = gc.get_freeze_count()
        samples = HeapSamples()
        result = await run_preset_async(paced_preset, engine=engine, progress=samples, progress_interval=0.02)
        assert result.error is None
        kept = len(result.telemetry.iterations) + len(result.telemetry.requests)
        assert kept >= 2 * EVERY
        assert max(frozen for *_, frozen in samples.rows) <= start_up
        kept, unfrozen, _, _ = samples.rows[-1]
        assert kept >= EVERY and unfrozen == kept  # a full collection walks every record it kept
    finally:
        await engine.stop()


def test_a_replay_on_the_virtual_clock_holds_the_freeze_and_refreezes(paced_preset):
    """No wall-clock pause to avoid there, but CPU time: full collections would walk everything kept."""
    from batchdeck.presets.replay import run_preset

    result = run_preset(paced_preset)
    freezer = next(s for s in result.driver.engine.engine.sink.sinks if isinstance(s, RetainedFreezer))
    # a refreeze counts only while a hold is active: the inline engine held it for the whole run
    assert freezer.records >= EVERY and freezer.refreezes == freezer.records // EVERY
