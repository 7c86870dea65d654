"""Key latency of the console under a flood of telemetry: how long a key takes to be handled while a
feeder pushes ~1,000 iteration records per second (plus a finished request every 20 iterations).

    python benchmarks/console_key_latency.py --out benchmarks/results/console_key_latency.json

The target (a key handled in < 200 ms at >= 500 records/s) is a speed target, so it lives here with
saved results; tests/test_console_snapshots.py runs the same feeder and checks only that every key is
handled and every record reaches the dashboard.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

from textual import events

from batchdeck.console.app import ConsoleApp
from batchdeck.console.client import FakeClient
from batchdeck.engine.telemetry import IterationRecord, RequestRecord


@dataclass
class KeyLatencyRun:
    latencies_s: list[float] = field(default_factory=list)
    records_per_s: float = 0.0
    fed: int = 0
    seen: int = 0
    dropped: int = 0


def _records(i: int) -> list:
    out = [("iteration", IterationRecord(
        i, i / 1000, 0.001, 0, 0, 0.0008, 0, 128 if i % 10 == 0 else 0, 32, 1, 32, 5, 0,
        300 + i % 100, 1024, (300 + i % 100) / 1024, 0, num_generated_tokens=32))]
    if i % 20 == 0:
        out.append(("request", RequestRecord(f"r{i}", "t", "interactive", 0, 100, 50, i / 1000 - 1,
                                             0.01, 0.1, 0.02, 0.02, 0.05, 0.06, 1.0, "length", 0, True,
                                             None, None, i / 1000)))
    return out


async def run(keys: int = 6, rate: float = 1000.0, key_deadline_s: float = 30.0) -> KeyLatencyRun:
    """Feed records at `rate`/s of wall time while pressing `keys` keys; each key must be handled within
    `key_deadline_s` (AssertionError otherwise)."""
    client = FakeClient()
    app = ConsoleApp(client, refresh_hz=10)
    result = KeyLatencyRun()
    stop = False

    async def feeder() -> None:
        t0 = time.perf_counter()
        while not stop:
            due = int((time.perf_counter() - t0) * rate)
            batch = []
            while result.fed < due:
                batch += _records(result.fed)
                result.fed += 1
            client.feed(batch)
            await asyncio.sleep(0.005)

    async with app.run_test(size=(120, 40)):
        task = asyncio.create_task(feeder())
        await asyncio.sleep(0.5)
        start_fed, t_start = result.fed, time.perf_counter()
        for _ in range(keys):
            frozen = app.frozen
            t0 = time.perf_counter()
            app._driver.send_message(events.Key("f", "f"))
            while app.frozen == frozen:
                await asyncio.sleep(0.002)
                assert time.perf_counter() - t0 < key_deadline_s, f"a key was not handled within {key_deadline_s} s"
            result.latencies_s.append(time.perf_counter() - t0)
            await asyncio.sleep(0.4)
        result.records_per_s = (result.fed - start_fed) / (time.perf_counter() - t_start)
        stop = True
        await task
        app.tick()
        result.seen = app.state.counts.get("iteration", 0)
        result.dropped = client.dropped
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    r = asyncio.run(run(args.keys, args.rate))
    res = {"benchmark": "console_key_latency", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python benchmarks/console_key_latency.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"load average {os.getloadavg()[0]:.1f}",
           "records_per_s": r.records_per_s, "key_latency_ms": sorted(x * 1e3 for x in r.latencies_s),
           "max_ms": max(r.latencies_s) * 1e3, "target": "< 200 ms at >= 500 records/s",
           "met": max(r.latencies_s) < 0.2 and r.records_per_s >= 500, "dropped": r.dropped}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
