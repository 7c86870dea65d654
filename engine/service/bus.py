"""One in-process publish/subscribe bus for telemetry and control records.

`publish(topic, record)` is called from the engine's worker thread (and from anywhere else); it
never blocks on a subscriber and never raises because of one. Two kinds of receivers:

- async `Subscription`s (`bus.subscribe(...)`), each owned by one asyncio loop. Records go into a
  bounded per-subscription buffer under a short lock (O(1) work only, so a slow reader cannot hold
  up the publisher); the loop is woken with `call_soon_threadsafe` only when the buffer goes from
  empty to non-empty, so a burst of records costs one wake-up, not one per record. When the buffer
  is full the oldest record is dropped ("drop-oldest"), or only the latest record per topic is
  kept ("coalesce"); `.dropped` counts every record the subscriber will never see. The reader
  takes the buffer whole (one lock hold per batch) and reads from that batch, so a subscription
  holds at most 2 x maxsize records (coalesce: one per topic in each). A subscription
  whose loop is closed drops (and counts) everything; one whose loop is not running yet keeps
  buffering up to `maxsize`.
- synchronous listeners (`bus.add_listener(fn, topics)`), called inline in the publisher's thread:
  for recorders and tests. Their exceptions are caught and counted, never propagated.

The bus is itself a telemetry sink: `bus(topic, record)` is `bus.publish(topic, record)`.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

Policy = Literal["drop-oldest", "coalesce"]
POLICIES: tuple[str, ...] = ("drop-oldest", "coalesce")


class Message(NamedTuple):
    """What a subscription yields: the topic and the record published on it."""

    topic: str
    record: Any


class SubscriptionClosed(Exception):
    """Raised by `Subscription.get()` once the subscription is closed and its buffer is empty."""


def _topic_set(topics: Iterable[str] | None) -> frozenset[str] | None:
    if topics is None:
        return None
    if isinstance(topics, str):  # a bare string would otherwise become a set of characters
        return frozenset((topics,))
    return frozenset(topics)


class Subscription:
    """An async receiver bound to one asyncio loop. Create it with `Bus.subscribe()`.

    Read with `await sub.get()`, `async for msg in sub`, or `sub.drain()` from a timer on the loop.
    """

    def __init__(
        self,
        bus: Bus,
        topics: frozenset[str] | None,
        maxsize: int,
        policy: Policy,
        loop: asyncio.AbstractEventLoop,
        name: str,
    ) -> None:
        self.topics = topics
        self.maxsize = maxsize
        self.policy = policy
        self.name = name
        self.dropped = 0  # records this subscriber will never see (overflow, coalesced, loop closed)
        self.delivered = 0  # records handed to the reader
        self.wakeups = 0  # call_soon_threadsafe calls made for this subscription
        self._bus = bus
        self._loop = loop
        self._lock = threading.Lock()
        self._queue: deque[Message] = deque(maxlen=maxsize)  # drop-oldest
        self._latest: dict[str, Message] = {}  # coalesce: topic -> latest message, oldest first
        self._batch: deque[Message] = deque()  # taken from the buffer by the reader, not yet read
        self._ready = asyncio.Event()  # set on the loop thread only
        self._closed = False

    # -- publisher side (any thread) ------------------------------------------------------------
    def _offer(self, topic: str, record: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if self._loop.is_closed():
                self.dropped += 1
                return
            if self.policy == "coalesce":
                was_empty = not self._latest
                if self._latest.pop(topic, None) is not None:
                    self.dropped += 1  # superseded by this newer record on the same topic
                self._latest[topic] = Message(topic, record)
            else:
                queue = self._queue
                was_empty = not queue
                if len(queue) == self.maxsize:
                    self.dropped += 1  # deque(maxlen) drops the oldest on append
                queue.append(Message(topic, record))
        if was_empty:  # only the empty -> non-empty transition needs to wake the reader
            self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
            self.wakeups += 1
        except RuntimeError:  # the loop closed between the check and the call: nobody will read
            with self._lock:
                self.dropped += len(self._queue) + len(self._latest)
                self._queue.clear()
                self._latest = {}

    # -- reader side (the subscription's loop) --------------------------------------------------
    # The reader takes the whole buffer in one lock acquisition and serves from a private batch,
    # so reading costs the publisher one short lock hold per batch, not per record. At most
    # maxsize records sit in the batch and maxsize more in the buffer.
    def _take_batch(self) -> bool:
        with self._lock:
            if self._queue:
                self._batch = self._queue
                self._queue = deque(maxlen=self.maxsize)
            elif self._latest:
                self._batch = deque(self._latest.values())
                self._latest = {}
            else:
                return False
        return True

    def qsize(self) -> int:
        """Records waiting to be read."""
        with self._lock:
            return len(self._queue) + len(self._latest) + len(self._batch)

    def get_nowait(self) -> Message | None:
        """The next message, or None if there is none right now."""
        if not self._batch and not self._take_batch():
            return None
        self.delivered += 1
        return self._batch.popleft()

    def drain(self, max_items: int | None = None) -> list[Message]:
        """Everything buffered now (up to `max_items`), oldest first; never waits."""
        out: list[Message] = []
        while max_items is None or len(out) < max_items:
            if not self._batch and not self._take_batch():
                break
            take = len(self._batch) if max_items is None else min(len(self._batch), max_items - len(out))
            out.extend(self._batch.popleft() for _ in range(take))
        self.delivered += len(out)
        return out

    async def get(self) -> Message:
        """Wait for the next message. Raises SubscriptionClosed once closed and drained."""
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            if self._closed:
                raise SubscriptionClosed(f"subscription {self.name!r} is closed")
            # Nothing buffered: a publish from now on finds the buffer empty and schedules a wake-up
            # (after this clear(), since both run on this loop), so waiting here cannot miss it.
            self._ready.clear()
            await self._ready.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Unsubscribe; a waiting `get()` ends once the buffer is drained. Safe from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._bus._remove(self)
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topics": sorted(self.topics) if self.topics is not None else None,
            "policy": self.policy,
            "maxsize": self.maxsize,
            "queued": self.qsize(),
            "delivered": self.delivered,
            "dropped": self.dropped,
            "wakeups": self.wakeups,
        }


class Listener:
    """A synchronous callback `fn(topic, record)` called inline by `publish`. Create it with
    `Bus.add_listener()`."""

    def __init__(self, bus: Bus, fn: Callable[[str, Any], None], topics: frozenset[str] | None, name: str) -> None:
        self.fn = fn
        self.topics = topics
        self.name = name
        self.calls = 0  # counters are exact with one publishing thread, approximate with several
        self.errors = 0
        self.last_error: BaseException | None = None
        self._bus = bus

    def _offer(self, topic: str, record: Any) -> None:
        self.calls += 1
        try:
            self.fn(topic, record)
        except Exception as exc:  # a broken listener must not break the engine
            self.errors += 1
            self.last_error = exc

    def close(self) -> None:
        """Stop calling this listener."""
        self._bus._remove(self)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topics": sorted(self.topics) if self.topics is not None else None,
            "calls": self.calls,
            "errors": self.errors,
            "last_error": repr(self.last_error) if self.last_error is not None else None,
        }


class Bus:
    """The publish/subscribe hub. Thread-safe; `publish` is cheap and never blocks or raises
    because of a receiver. Receivers are kept in copy-on-write tuples, so publish reads them
    without taking the bus lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards receiver lists, routes and published counts
        self._receivers: tuple[Subscription | Listener, ...] = ()
        self._routes: dict[str, tuple[Subscription | Listener, ...]] = {}
        self._published: dict[str, int] = {}
        self._closed = False
        self._names = 0

    def publish(self, topic: str, record: Any) -> None:
        """Hand `record` to every receiver of `topic`. Never blocks on, or raises because of, one."""
        if self._closed:
            return
        with self._lock:
            self._published[topic] = self._published.get(topic, 0) + 1
            targets = self._routes.get(topic)
            if targets is None:
                targets = tuple(r for r in self._receivers if r.topics is None or topic in r.topics)
                self._routes[topic] = targets
        for receiver in targets:
            try:
                receiver._offer(topic, record)
            except Exception:  # defensive: _offer already handles the expected failures
                if isinstance(receiver, Subscription):
                    receiver.dropped += 1
                else:
                    receiver.errors += 1

    __call__ = publish

    def subscribe(
        self,
        topics: Iterable[str] | None = None,
        maxsize: int = 1024,
        policy: Policy = "drop-oldest",
        *,
        name: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """An async subscription to `topics` (None = all) delivered on `loop` (default: the running
        loop). `maxsize` bounds its buffer for "drop-oldest"; "coalesce" keeps one record per topic."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an integer >= 1, got {maxsize!r}")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("Bus.subscribe() needs a running asyncio loop, or pass loop=") from None
        sub = Subscription(self, _topic_set(topics), maxsize, policy, loop, name or self._next_name("sub"))
        self._add(sub)
        return sub

    def add_listener(
        self, fn: Callable[[str, Any], None], topics: Iterable[str] | None = None, *, name: str | None = None
    ) -> Listener:
        """Call `fn(topic, record)` inline for each record on `topics` (None = all)."""
        listener = Listener(self, fn, _topic_set(topics), name or getattr(fn, "__name__", None) or self._next_name("listener"))
        self._add(listener)
        return listener

    def unsubscribe(self, receiver: Subscription | Listener) -> None:
        """Remove a subscription or listener (same as its `close()`)."""
        receiver.close()

    def close(self) -> None:
        """Close every subscription and listener; later publishes are ignored."""
        self._closed = True
        for receiver in self._receivers:
            receiver.close()

    def stats(self) -> dict[str, Any]:
        """Published counts per topic and per-receiver counters (dropped, errors, ...)."""
        with self._lock:
            published = dict(self._published)
            receivers = self._receivers
        return {
            "published": published,
            "published_total": sum(published.values()),
            "subscriptions": [r.stats() for r in receivers if isinstance(r, Subscription)],
            "listeners": [r.stats() for r in receivers if isinstance(r, Listener)],
        }

    # -- internals ------------------------------------------------------------------------------
    def _next_name(self, prefix: str) -> str:
        with self._lock:
            self._names += 1
            return f"{prefix}-{self._names}"

    def _add(self, receiver: Subscription | Listener) -> None:
        with self._lock:
            self._receivers = (*self._receivers, receiver)
            self._routes = {}

    def _remove(self, receiver: Subscription | Listener) -> None:
        with self._lock:
            self._receivers = tuple(r for r in self._receivers if r is not receiver)
            self._routes = {}
