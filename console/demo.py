"""A deterministic, engine-free telemetry session: plausible records from a seeded toy simulation.

Used by the snapshot and stress tests (fixed records, fixed clock: the same screen every run) and
for trying the console's layout without a model. Nothing here is a measurement.
"""
from __future__ import annotations

import random
from typing import Any

from batchdeck.engine.service.gpu_monitor import GpuSample
from batchdeck.engine.telemetry import Event, IterationRecord, RequestRecord

TENANTS = (("alice", "interactive"), ("bob", "interactive"), ("carol", "batch"), ("dave", "realtime"))


def synthetic_session(iterations: int = 400, *, seed: int = 7, step_s: float = 0.02, num_blocks: int = 1024,
                      block_size: int = 16, budget: int = 512, max_num_seqs: int = 8,
                      change_at: int | None = 250, gpu: bool = False, spec_k: int = 0,
                      spec_accept: float = 0.6) -> list[tuple[str, Any]]:
    """(topic, record) messages for `iterations` iterations of a toy engine, in time order.

    spec_k > 0: each decode step also verifies up to `spec_k` drafted tokens, each accepted (until
    the first rejection) with probability `spec_accept`, drawn from a generator of its own so that
    spec_k=0 gives exactly the records it always gave."""
    rng = random.Random(seed)
    spec_rng = random.Random(seed + 1)
    out: list[tuple[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    running: list[dict[str, Any]] = []
    next_id = 0
    t = 0.0
    version = 0
    cap = max_num_seqs
    for it in range(iterations):
        # arrivals
        for _ in range(1 if rng.random() < 0.11 else 0):
            tenant, cls = TENANTS[next_id % len(TENANTS)]
            waiting.append({"request_id": f"r{next_id:05d}", "tenant": tenant, "slo_class": cls, "priority": 0,
                            "prompt": rng.randint(32, 600), "done_prompt": 0, "max_tokens": rng.randint(16, 96),
                            "out": 0, "arrival": t, "ttft": None, "preemptions": 0, "proposed": 0,
                            "accepted": 0})
            next_id += 1
        if change_at is not None and it == change_at:
            version += 1
            cap = max(2, max_num_seqs // 2)
            out.append(("event", Event("config_change", t, it, {"changes": {"policy": "sjf", "max_num_seqs": cap},
                                                                "applied_iteration": it, "source": "console",
                                                                "version": version})))
        while waiting and len(running) < cap:
            running.append(waiting.pop(0))
        preempted = 0
        if len(running) > cap:
            victim = running.pop()
            victim["done_prompt"], victim["out"] = 0, 0
            victim["preemptions"] += 1
            waiting.insert(0, victim)
            preempted = 1
            out.append(("event", Event("preemption", t, it, {"request_id": victim["request_id"],
                                                             "tenant": victim["tenant"],
                                                             "num_preemptions": victim["preemptions"],
                                                             "reason": "kv_cache_full"})))
        decode = sum(1 for r in running if r["done_prompt"] >= r["prompt"])
        left = budget - decode
        prefill = chunks = 0
        for r in running:
            need = r["prompt"] - r["done_prompt"]
            if need > 0 and left > 0:
                n = min(need, left, 256)
                r["done_prompt"] += n
                prefill += n
                left -= n
                chunks += 1
        step = 0.004 + 0.00002 * prefill + 0.0003 * decode + rng.random() * 0.001
        t += max(step, step_s)
        finished_now = []
        ttfts = []
        itls: list[float] = []
        generated = proposed = accepted = 0
        for r in running:
            if r["done_prompt"] >= r["prompt"]:
                if spec_k and r["ttft"] is not None:  # drafts follow a token the request already has
                    drafted = min(spec_k, r["max_tokens"] - r["out"] - 1)
                    took = 0
                    while took < drafted and spec_rng.random() < spec_accept:
                        took += 1
                    r["proposed"] += drafted
                    r["accepted"] += took
                    r["out"] += took
                    proposed += drafted
                    accepted += took
                    generated += took
                r["out"] += 1
                generated += 1
                if r["ttft"] is None:
                    r["ttft"] = t - r["arrival"]
                    ttfts.append(r["ttft"])
                else:
                    itls.append(t - r["last"])
                r["last"] = t
                if r["out"] >= r["max_tokens"]:
                    finished_now.append(r)
        for r in finished_now:
            running.remove(r)
            e2e = t - r["arrival"]
            tpot = (e2e - r["ttft"]) / max(1, r["out"] - 1)
            out.append(("request", RequestRecord(
                request_id=r["request_id"], tenant=r["tenant"], slo_class=r["slo_class"], priority=0,
                prompt_tokens=r["prompt"], output_tokens=r["out"], arrival=r["arrival"], queue_time=0.01,
                ttft=r["ttft"], tpot=tpot, itl_p50=tpot, itl_p99=tpot * 2.5, itl_max=tpot * 3, e2e_latency=e2e,
                finish_reason="length", num_preemptions=r["preemptions"],
                slo_met=r["ttft"] < {"realtime": 0.5, "interactive": 2.0, "batch": 10.0}[r["slo_class"]],
                first_token_iteration=None, finish_iteration=it, finish=t, spec_proposed=r["proposed"],
                spec_accepted=r["accepted"])))
        used = sum(-(-(r["done_prompt"] + r["out"]) // block_size) for r in running)
        out.append(("iteration", IterationRecord(
            iteration=it, time=t, step_time=step, schedule_time=step * 0.05, prepare_time=step * 0.1,
            forward_time=step * 0.8, sample_time=step * 0.05, num_prefill_tokens=prefill,
            num_decode_tokens=decode + proposed,
            num_prefill_chunks=chunks, num_requests_running=len(running), num_requests_waiting=len(waiting),
            num_preemptions=preempted, kv_blocks_used=used, kv_blocks_total=num_blocks,
            kv_cache_usage=used / num_blocks, config_version=version, num_finished=len(finished_now),
            num_generated_tokens=generated, spec_proposed=proposed, spec_accepted=accepted, ttfts=ttfts, itls=itls,
            tenant_tokens={})))
        if it % 25 == 24:
            rows = []
            for state, queue in (("running", running), ("waiting", waiting)):
                for r in queue:
                    st = ("prefill" if r["done_prompt"] < r["prompt"] else "decode") if state == "running" else (
                        "preempted" if r["preemptions"] else "waiting")
                    rows.append({"request_id": r["request_id"], "tenant": r["tenant"], "slo_class": r["slo_class"],
                                 "priority": 0, "state": st, "prompt_tokens": r["prompt"], "output_tokens": r["out"],
                                 "max_tokens": r["max_tokens"], "ttft": r["ttft"], "arrival": r["arrival"],
                                 "num_preemptions": r["preemptions"], "num_cached_tokens": 0})
            out.append(("requests", {"time": t, "iteration": it, "requests": rows}))
        if it % 50 == 0:
            out.append(("gpu", _gpu(t, it, gpu)))
    return out


def _gpu(t: float, it: int, available: bool) -> GpuSample:
    if not available:
        return GpuSample(t, False, "NVML unavailable (no NVIDIA driver or GPU?)", kv_pool_bytes=64 << 20)
    gib = 1 << 30
    return GpuSample(t, True, None, 0, "NVIDIA H100 80GB HBM3", memory_used=int(61.2 * gib), memory_total=80 * gib,
                     memory_reserved=int(0.5 * gib), utilization_gpu=80 + it % 17, utilization_memory=40,
                     power_w=420.0 + it % 50, power_limit_w=700.0, temperature_c=61, sm_clock_mhz=1980,
                     mem_clock_mhz=2619, torch_allocated=int(58.4 * gib), torch_reserved=int(59.0 * gib),
                     kv_pool_bytes=int(52.0 * gib))
