"""Bus publish cost: 200,000 IterationRecords published from a worker thread (as the engine does)
while an asyncio loop in the main thread runs the subscribers.

Scenarios: no subscriber (the floor), one subscriber that reads, and the same plus one subscriber
that never reads (maxsize 1024, drop-oldest), all flat out; then the last one paced at 10,000
records/s in bursts of 100 (far above a real engine's iteration rate), where the reader should keep
up. Reports the publish rate seen by the publishing thread (paced: records / time inside publish),
the stuck subscriber's drop counter, and what the reader got. Prints JSON and writes
benchmarks/results/bus_bench.json.

    .venv/bin/python benchmarks/bus_bench.py [--records 200000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchdeck.engine.service.bus import Bus, Subscription  # noqa: E402
from batchdeck.engine.telemetry import IterationRecord  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bus_bench.json"


def make_records(n: int) -> list[IterationRecord]:
    return [
        IterationRecord(
            iteration=i, time=i * 0.01, step_time=0.01, schedule_time=0.001, prepare_time=0.001,
            forward_time=0.007, sample_time=0.001, num_prefill_tokens=512 if i % 10 == 0 else 0,
            num_decode_tokens=32, num_prefill_chunks=int(i % 10 == 0), num_requests_running=32,
            num_requests_waiting=4, num_preemptions=0, kv_blocks_used=700, kv_blocks_total=1000,
            kv_cache_usage=0.7, config_version=1, num_generated_tokens=32,
        )
        for i in range(n)
    ]


async def _read(sub: Subscription, counter: list[int]) -> None:
    async for _ in sub:
        counter[0] += 1


async def run_scenario(
    records: list[IterationRecord], reader: bool, stuck: bool, pace_per_s: float | None = None, burst: int = 100
) -> dict:
    """Publish `records` from a thread; with `pace_per_s`, in bursts of `burst` at that mean rate."""
    bus = Bus()
    read_count = [0]
    read_sub = bus.subscribe({"iteration"}, maxsize=1024, name="reader") if reader else None
    stuck_sub = bus.subscribe({"iteration"}, maxsize=1024, name="stuck") if stuck else None
    reader_task = asyncio.create_task(_read(read_sub, read_count)) if read_sub else None
    elapsed = [0.0]

    def produce() -> None:
        publish = bus.publish
        t0 = time.perf_counter()
        if pace_per_s is None:
            for rec in records:
                publish("iteration", rec)
        else:
            busy = 0.0
            for start in range(0, len(records), burst):
                b0 = time.perf_counter()
                for rec in records[start:start + burst]:
                    publish("iteration", rec)
                busy += time.perf_counter() - b0
                time.sleep(max(0.0, t0 + (start + burst) / pace_per_s - time.perf_counter()))
            elapsed[0] = busy  # time spent inside publish, not sleeping
            return
        elapsed[0] = time.perf_counter() - t0

    thread = threading.Thread(target=produce, name="engine-worker")
    thread.start()
    while thread.is_alive():  # keep the loop (and the reader) running while the thread publishes
        await asyncio.sleep(0.005)
    thread.join()
    if read_sub is not None:
        deadline = time.monotonic() + 30.0
        while read_sub.qsize() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        read_sub.close()
        await reader_task
    n = len(records)
    out: dict = {"pace_per_s": pace_per_s} if pace_per_s else {}
    out |= {
        "publish_s": elapsed[0],
        "publish_rate_per_s": n / elapsed[0],
        "publish_cost_us": elapsed[0] / n * 1e6,
    }
    if read_sub is not None:
        out["reader"] = {"received": read_count[0], "dropped": read_sub.dropped, "wakeups": read_sub.wakeups}
    if stuck_sub is not None:
        out["stuck"] = {"dropped": stuck_sub.dropped, "queued": stuck_sub.qsize(), "wakeups": stuck_sub.wakeups}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    records = make_records(args.records)
    scenarios = {
        "no_subscriber": dict(reader=False, stuck=False),
        "reader": dict(reader=True, stuck=False),
        "reader_and_stuck": dict(reader=True, stuck=True),
        "reader_and_stuck_paced": dict(reader=True, stuck=True, pace_per_s=10_000.0),
    }
    paced_records = records[: min(len(records), 20_000)]  # 2 s per run at 10k/s
    results: dict[str, dict] = {}
    for name, kwargs in scenarios.items():
        recs = paced_records if "pace_per_s" in kwargs else records
        runs = [asyncio.run(run_scenario(recs, **kwargs)) for _ in range(args.repeats)]
        best = sorted(runs, key=lambda r: r["publish_rate_per_s"])[len(runs) // 2]  # the median run
        results[name] = {
            "records": len(recs),
            **best,
            "publish_rate_per_s_runs": [round(r["publish_rate_per_s"]) for r in runs],
            "publish_rate_per_s_median": statistics.median(r["publish_rate_per_s"] for r in runs),
        }

    report = {
        "benchmark": "bus_bench",
        "records": args.records,
        "repeats": args.repeats,
        "record_type": "IterationRecord",
        "subscriber_maxsize": 1024,
        "reader": "async for over Subscription.get() on the main-thread asyncio loop",
        "scenarios": results,
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": sys.version,
            "implementation": platform.python_implementation(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
