"""engine/bus.py: ordering, bounded buffers, coalescing, listeners, threads and closed loops."""
from __future__ import annotations

import asyncio
import threading

import pytest

from batchdeck.engine.service.bus import Bus, Message, SubscriptionClosed

TIMEOUT = 30.0  # generous upper bound for waits: a hang fails the test instead of blocking it


async def test_async_subscriber_gets_records_in_order():
    bus = Bus()
    sub = bus.subscribe()
    for i in range(100):
        bus.publish("iteration", i)
    got = [await asyncio.wait_for(sub.get(), TIMEOUT) for _ in range(100)]
    assert got == [Message("iteration", i) for i in range(100)]
    assert sub.dropped == 0
    assert bus.stats()["published"] == {"iteration": 100}


async def test_topic_filter_and_bus_as_sink():
    bus = Bus()
    requests_only = bus.subscribe({"request"})
    everything = bus.subscribe(None)
    bus("iteration", 1)  # the bus is a TelemetrySink
    bus.publish("request", 2)
    bus.publish("gpu", 3)
    assert requests_only.drain() == [Message("request", 2)]
    assert [m.topic for m in everything.drain()] == ["iteration", "request", "gpu"]


async def test_drop_oldest_counts_exactly_the_overflow():
    bus = Bus()
    stuck = bus.subscribe(maxsize=10)  # never reads until the end
    reader = bus.subscribe(maxsize=1000)
    for i in range(25):
        bus.publish("iteration", i)
    assert stuck.dropped == 15
    assert [m.record for m in stuck.drain()] == list(range(15, 25))  # the newest 10, in order
    assert reader.dropped == 0 and len(reader.drain()) == 25
    stats = {s["name"]: s for s in bus.stats()["subscriptions"]}
    assert stats[stuck.name]["dropped"] == 15


async def test_coalesce_keeps_latest_per_topic():
    bus = Bus()
    sub = bus.subscribe(policy="coalesce")
    bus.publish("iteration", 1)
    bus.publish("gpu", "g1")
    bus.publish("iteration", 2)
    bus.publish("event", "e1")
    bus.publish("iteration", 3)
    assert sub.drain() == [Message("gpu", "g1"), Message("event", "e1"), Message("iteration", 3)]
    assert sub.dropped == 2  # iterations 1 and 2 were superseded
    bus.publish("iteration", 4)
    assert await asyncio.wait_for(sub.get(), TIMEOUT) == Message("iteration", 4)


async def test_listener_exceptions_do_not_propagate():
    bus = Bus()
    seen: list[tuple[str, object]] = []

    def broken(topic: str, record: object) -> None:
        raise RuntimeError("listener bug")

    bad = bus.add_listener(broken)
    bus.add_listener(lambda t, r: seen.append((t, r)), {"iteration"})
    sub = bus.subscribe()
    bus.publish("iteration", 1)  # must not raise
    bus.publish("event", 2)
    assert seen == [("iteration", 1)]  # later listeners still ran; topic filter applied
    assert len(sub.drain()) == 2
    assert bad.errors == 2 and bad.calls == 2
    listener_stats = {s["name"]: s for s in bus.stats()["listeners"]}
    assert listener_stats["broken"]["errors"] == 2
    bad.close()
    bus.publish("iteration", 3)
    assert bad.calls == 2


async def test_publish_from_thread_reaches_async_subscriber():
    bus = Bus()
    sub = bus.subscribe(maxsize=100_000)
    n = 5000

    def produce() -> None:
        for i in range(n):
            bus.publish("iteration", i)

    thread = threading.Thread(target=produce)
    thread.start()
    got = [(await asyncio.wait_for(sub.get(), TIMEOUT)).record for _ in range(n)]
    thread.join(TIMEOUT)
    assert got == list(range(n))
    assert sub.dropped == 0
    assert 1 <= sub.wakeups <= n


def test_wakeups_are_batched_while_the_reader_is_behind():
    """A burst into an empty buffer schedules one wake-up, not one per record."""
    loop = asyncio.new_event_loop()
    try:
        bus = Bus()
        sub = bus.subscribe(loop=loop)
        thread = threading.Thread(target=lambda: [bus.publish("iteration", i) for i in range(500)])
        thread.start()
        thread.join(TIMEOUT)
        assert sub.wakeups == 1  # the loop is not running: records wait in the buffer
        got = loop.run_until_complete(asyncio.wait_for(_take(sub, 500), TIMEOUT))
        assert got == list(range(500))
    finally:
        loop.close()


async def _take(sub, n: int) -> list[object]:
    return [(await sub.get()).record for _ in range(n)]


def test_publish_after_loop_close_does_not_raise():
    loop = asyncio.new_event_loop()
    bus = Bus()
    sub = bus.subscribe(loop=loop)
    loop.close()
    bus.publish("iteration", 1)  # same thread
    thread = threading.Thread(target=lambda: bus.publish("iteration", 2))
    thread.start()
    thread.join(TIMEOUT)
    assert sub.dropped == 2
    assert bus.stats()["published_total"] == 2
    sub.close()  # also safe on a closed loop


def test_subscribe_validates_arguments():
    bus = Bus()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="policy"):
            bus.subscribe(policy="newest", loop=loop)
        with pytest.raises(ValueError, match="maxsize"):
            bus.subscribe(maxsize=0, loop=loop)
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="running asyncio loop"):
        bus.subscribe()


async def test_close_ends_iteration_and_stops_delivery():
    bus = Bus()
    sub = bus.subscribe()
    bus.publish("event", "a")
    received: list[object] = []

    async def consume() -> None:
        async for msg in sub:
            received.append(msg.record)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    threading.Thread(target=sub.close).start()  # close from another thread
    await asyncio.wait_for(task, TIMEOUT)
    assert received == ["a"]
    bus.publish("event", "b")  # no longer delivered
    assert sub.qsize() == 0
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    assert bus.stats()["subscriptions"] == []


async def test_bus_close_closes_everything():
    bus = Bus()
    sub = bus.subscribe()
    calls: list[object] = []
    bus.add_listener(lambda t, r: calls.append(r))
    bus.close()
    bus.publish("iteration", 1)
    assert sub.closed and calls == [] and sub.qsize() == 0
