"""Benchmark: `batchdeck serve` under many streaming clients against the same workload through `generate`,
a request-rate sweep with `batchdeck bench`, and the HTTP path's CPU cost per streamed token.

    PYTHONPATH=. python benchmarks/gpu_serve.py --out benchmarks/results/gpu_serve_qwen3-0.6b.json
    PYTHONPATH=. python benchmarks/gpu_serve.py --smoke --out /tmp/gpu_serve_smoke.json   # CPU, synthetic:tiny
    PYTHONPATH=. python benchmarks/gpu_serve.py --sim h200-qwen3-0.6b --clients 64 --requests 256 \
        --output-tokens 64 --client-procs 2 --sweep-rates inf --out /tmp/serve_sim.json  # CPU, a simulated H200

One command does everything, each engine in a fresh process:

1. generate: `--requests` requests (prompt lengths uniform in [--prompt-min, --prompt-max], token ids
   uniform over [0, 256), random.Random(--seed); `--output-tokens` each, ignore_eos, greedy) written as
   JSONL and served by the offline `generate` path (engine/service/generate.py run_generate) with
   max_num_seqs = --clients, after a warm-up; output tok/s = output tokens / the run's span. The
   process's CPU seconds (time.process_time) are recorded.
2. http: `batchdeck serve` is started as a subprocess with the same engine flags; this process runs
   --clients closed-loop streaming clients (httpx, one connection each, spread over --client-procs
   processes so that parsing the streams is not the bottleneck) that share the same request list
   (client i sends requests i, i + clients, ...); output tok/s = streamed tokens (usage) / the span
   from the common start to the last finish. The server's CPU seconds over the run come from
   /proc/PID/stat: the HTTP process's and (by default `serve` runs its engine in a child process)
   the engine process's; the clients' from time.process_time in each client process. Per request the
   clients also record the end-to-end time, the wait from the last token chunk to the stream's end
   and the number of token chunks (a chunk can carry several tokens).
   HTTP path CPU per streamed token = the HTTP process's CPU / output tokens (parsing,
   detokenizing, SSE, the event loop, metrics, reading the engine's outputs off the pipe); with
   --engine-in-process it is estimated as (server CPU - generate CPU) / output tokens, which is
   also reported as http_cpu_us_per_token_by_difference in both layouts.
3. sweep: against the same server, `batchdeck bench`'s run_bench plays a poisson workload of
   --sweep-requests requests at each rate of --sweep-rates (inf = all at once): TTFT and ITL
   (every gap between streamed chunks) p50/p99 against rate.

Target: http tok/s >= 90% of generate tok/s (`ratio` in the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchdeck.engine.settings import flag_of  # noqa: E402 - the settings table only: no torch
from benchmarks.bench_common import command_line, dist, log, run_script, write_json  # noqa: E402


READY_TIMEOUT_S = 300.0  # for every client process to import, connect and finish its warm-up request
CLIENTS_TIMEOUT_S = 3600.0  # for a client process's whole share of the requests


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--prompt-min", type=int, default=100)
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--client-procs", type=int, default=4, help="processes the HTTP clients are spread over")
    p.add_argument("--sweep-rates", default="8,16,32,64,inf")
    p.add_argument("--sweep-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-in-process", action="store_true",
                   help="serve with --engine-in-process (the engine's thread shares the HTTP process's GIL)")
    p.add_argument("--sim", default=None, metavar="PROFILE",
                   help="both engines simulate the device of this calibration profile (e.g. h200-qwen3-0.6b): the "
                        "HTTP path at that device's speed, on a machine without it")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test: synthetic:tiny and small sizes (sizes given explicitly are kept)")
    p.add_argument("--out", default=None)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        smoke = dict(model="synthetic:tiny", device="cpu", clients=8, requests=24, prompt_min=16, prompt_max=64,
                     output_tokens=16, sweep_rates="10,inf", sweep_requests=16, num_blocks=1024, client_procs=2)
        for name, value in smoke.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def smoke_env(args: argparse.Namespace) -> dict | None:
    """On CPU both engines run one intra-op thread: a small model gains nothing from more, and on a
    busy machine spinning OpenMP threads make the comparison a lottery."""
    return {"OMP_NUM_THREADS": "1"} if args.smoke else None


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine settings both engines start with, as the settings table spells their flags."""
    settings = {"model": args.model, "max_num_seqs": args.clients, "max_batched_tokens": args.max_batched_tokens,
                "seed": args.seed, "device": args.device, "dtype": args.dtype, "num_blocks": args.num_blocks,
                "sim": args.sim}
    return [part for name, value in settings.items() if value is not None for part in (flag_of(name), str(value))]


def make_workload(args: argparse.Namespace, path: str) -> list[dict]:
    rng = random.Random(args.seed)
    reqs = [{"id": f"r{i}", "prompt_token_ids": [rng.randrange(256) for _ in range(rng.randint(args.prompt_min,
                                                                                                  args.prompt_max))],
             "max_tokens": args.output_tokens, "ignore_eos": True, "temperature": 0.0} for i in range(args.requests)]
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    return reqs


# -- phase 1: generate (in its own process) ------------------------------------------------------

def phase_generate(args: argparse.Namespace) -> dict:
    from batchdeck.cli import build_parser
    from batchdeck.engine.service.flags import build_engine
    ns = build_parser().parse_args(["generate", "--input", args.workload, "--output", os.devnull,
                                    *engine_flags(args)])
    engine = build_engine(ns)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: the same shapes, few requests
        warm_in, warm_out = os.path.join(tmp, "warm.jsonl"), os.path.join(tmp, "warm_out.jsonl")
        with open(args.workload) as f, open(warm_in, "w") as w:
            for _, line in zip(range(min(args.clients, 32)), f):
                w.write(json.dumps({**json.loads(line), "id": "warm-" + json.loads(line)["id"]}) + "\n")
        _generate_file(engine, warm_in, warm_out)
        out = os.path.join(tmp, "out.jsonl")
        cpu0, t0 = time.process_time(), time.perf_counter()
        rc = _generate_file(engine, args.workload, out)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows = [json.loads(line) for line in open(out)]
    tokens = sum(len(r["output_token_ids"]) for r in rows)
    span = max(r["metrics"]["finish"] for r in rows)
    device = engine.device
    name = None
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    return {"rc": rc, "requests": len(rows), "output_tokens": tokens, "span_s": span, "wall_s": wall,
            "output_tok_s": tokens / span, "cpu_s": cpu, "device": str(device), "gpu": name,
            "ttft": dist([r["metrics"]["ttft"] for r in rows if r["metrics"]["ttft"] is not None])}


def _generate_file(engine, src: str, dst: str) -> int:
    from batchdeck.engine.service.generate import run_generate

    with open(src, "rb") as f_in, open(dst, "w") as f_out:
        return run_generate(engine, f_in, f_out, input_name=src, output_name=dst, progress=False)


# -- phase 2 and 3: the server ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process and all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_children(pid: int) -> list[int]:
    """The engine process(es) `batchdeck serve` spawned (not multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(kid)
        except OSError:
            pass
    return out


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "batchdeck.cli", "serve", *engine_flags(args), "--port", str(port),
           "--status-interval", "0", *(["--engine-in-process"] if args.engine_in_process else [])]
    log("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env={**os.environ, **(smoke_env(args) or {})})
    import httpx

    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"batchdeck serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("batchdeck serve did not answer /health in 900 s")
        time.sleep(0.5)


async def http_clients(base: str, reqs: list[dict], clients: int, mine: list[int], ready, go, start_at) -> dict:
    """Clients `mine` (of `clients`) run closed loops over their share of `reqs`: after a warm-up request,
    this process waits at `ready` (a barrier of every client process and the parent), then for `go`,
    and starts at the parent's `start_at` (a shared double, perf_counter seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=len(mine) + 8, max_keepalive_connections=len(mine) + 8)
    out = {"tokens": 0, "ttfts": [], "itls": [], "e2es": [], "chunks": [], "tails": [], "failures": []}

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=60), limits=limits) as client:
        async def one(r: dict, record: bool = True) -> None:
            body = {"prompt": r["prompt_token_ids"], "max_tokens": r["max_tokens"], "ignore_eos": True,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
            start = last = time.perf_counter()
            first, chunks = True, 0
            async with client.stream("POST", base + "/completions", json=body) as resp:
                if resp.status_code != 200:
                    out["failures"].append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]" or not record:
                        continue
                    now = time.perf_counter()
                    obj = json.loads(line[6:])
                    if obj.get("choices"):
                        out["ttfts" if first else "itls"].append(now - (start if first else last))
                        first, last, chunks = False, now, chunks + 1
                    if obj.get("usage"):
                        out["tokens"] += obj["usage"]["completion_tokens"]
            if record:
                end = time.perf_counter()
                out["e2es"].append(end - start)
                out["tails"].append(end - last)
                out["chunks"].append(chunks)

        async def client_loop(i: int) -> None:
            for r in reqs[i::clients]:
                await one(r)

        await one(reqs[0] | {"max_tokens": 4}, record=False)  # warm-up: a connection and the code paths
        ready.wait(timeout=READY_TIMEOUT_S)  # blocking on purpose: nothing else runs in this loop yet
        go.wait(timeout=READY_TIMEOUT_S)
        t0 = start_at.value
        cpu0 = time.process_time()
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        out["start_late_s"] = time.perf_counter() - t0
        await asyncio.gather(*(client_loop(i) for i in mine))
        out["end"] = time.perf_counter()
        out["cpu_s"] = time.process_time() - cpu0
    return out


def client_process(job: tuple, ready, go, start_at, results) -> None:
    """One client process (clients are spread over several: one Python process parses ~10^4 chunks/s)."""
    results.put(asyncio.run(http_clients(*job, ready, go, start_at)))


def run_clients(base: str, reqs: list[dict], clients: int, procs: int) -> dict:
    """`clients` closed-loop streaming clients over `procs` processes, started together: every process
    imports, connects and sends a warm-up request, then all start at one time the parent sets once the
    last is ready (CLOCK_MONOTONIC, which time.perf_counter reads on Linux, is the same clock in every
    process). The span runs from that time; `client_start_late_s` is the latest process's lag behind it."""
    import multiprocessing
    import queue
    import threading

    procs = max(1, min(procs, clients))
    ctx = multiprocessing.get_context("spawn")
    ready, go, start_at, results = ctx.Barrier(procs + 1), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    workers = [ctx.Process(target=client_process, args=((base, reqs, clients, list(range(k, clients, procs))),
                                                        ready, go, start_at, results), daemon=True)
               for k in range(procs)]
    for w in workers:
        w.start()
    try:
        ready.wait(timeout=READY_TIMEOUT_S)
    except threading.BrokenBarrierError as exc:  # a client process died or hung before its warm-up finished
        raise SystemExit(f"gpu_serve: the {procs} client processes were not all ready within {READY_TIMEOUT_S:.0f} s "
                         f"(exit codes {[w.exitcode for w in workers]}): {type(exc).__name__}") from None
    start_at.value = time.perf_counter() + 0.2
    go.set()
    parts = []
    for _ in workers:
        try:
            parts.append(results.get(timeout=CLIENTS_TIMEOUT_S))
        except queue.Empty:
            raise SystemExit(f"gpu_serve: a client process sent no result within {CLIENTS_TIMEOUT_S:.0f} s "
                             f"(exit codes {[w.exitcode for w in workers]})") from None
    for w in workers:
        w.join()
    tokens = sum(p["tokens"] for p in parts)
    span = max(p["end"] for p in parts) - start_at.value
    failures = [f for p in parts for f in p["failures"]]
    return {"output_tokens": tokens, "span_s": span, "output_tok_s": tokens / span, "failures": failures[:5],
            "num_failures": len(failures), "client_processes": procs,
            "client_start_late_s": max(p["start_late_s"] for p in parts),
            "client_cpu_s": sum(p["cpu_s"] for p in parts),
            "ttft": dist([t for p in parts for t in p["ttfts"]]), "itl": dist([t for p in parts for t in p["itls"]]),
            "e2e": dist([t for p in parts for t in p["e2es"]]),
            "last_chunk_to_end": dist([t for p in parts for t in p["tails"]]),
            "chunks_per_request": dist([c for p in parts for c in p["chunks"]])}


def sweep(args: argparse.Namespace, base: str) -> list[dict]:
    from batchdeck.presets import load_preset
    from batchdeck.presets.bench import run_bench, sweep_row, parse_rate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sweep.yaml")
        with open(path, "w") as f:
            f.write(f"""name: serve-sweep
description: poisson requests for the rate sweep
model: {args.model}
workload:
  - kind: poisson
    rate: 1
    count: {args.sweep_requests}
    input_tokens: {{dist: uniform, min: {args.prompt_min}, max: {args.prompt_max}}}
    output_tokens: {args.output_tokens}
seed: {args.seed}
""")
        preset = load_preset(path)
        for text in args.sweep_rates.split(","):
            rate = parse_rate(text)
            log(f"sweep: rate {text}")
            report = asyncio.run(run_bench(preset, base, request_rate=rate))
            rows.append(sweep_row(rate, report))
            log(f"  {rows[-1]}")
    return rows


def main() -> None:
    args = parse_args()
    if args.phase == "generate":
        write_json(args.phase_out, phase_generate(args))
        return
    result: dict = {"command": command_line("benchmarks/gpu_serve.py"), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        workload = os.path.join(tmp, "workload.jsonl")
        reqs = make_workload(args, workload)
        passthrough = [a for a in sys.argv[1:] if a not in ("--smoke",)]
        log("phase 1: generate")
        gen_argv = [*(["--smoke"] if args.smoke else []), *_strip_out(passthrough), "--phase", "generate",
                    "--workload", workload]
        result["generate"] = run_script(__file__, gen_argv, timeout=3600, env=smoke_env(args))
        result["gpu"] = result["generate"].get("gpu")
        port = free_port()
        server = start_server(args, port)
        base = f"http://127.0.0.1:{port}/v1"
        try:
            log(f"phase 2: {args.clients} streaming clients, {args.requests} requests")
            engines = engine_children(server.pid)
            cpu0, engine0 = proc_cpu_s(server.pid), sum(proc_cpu_s(pid) for pid in engines)
            result["http"] = run_clients(base, reqs, args.clients, args.client_procs)
            http_cpu = proc_cpu_s(server.pid) - cpu0
            engine_cpu = sum(proc_cpu_s(pid) for pid in engines) - engine0
            result["http"].update(server_cpu_s=http_cpu + engine_cpu, http_process_cpu_s=http_cpu,
                                  engine_process_cpu_s=engine_cpu if engines else None,
                                  engine_in_child=bool(engines))
            log("phase 3: rate sweep")
            result["sweep"] = sweep(args, base)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    gen, http = result["generate"], result["http"]
    if "output_tok_s" in gen:
        result["ratio"] = http["output_tok_s"] / gen["output_tok_s"]
        tokens = max(1, http["output_tokens"])
        extra = http["server_cpu_s"] - gen["cpu_s"]
        result["http_cpu_us_per_token_by_difference"] = 1e6 * extra / tokens
        # with the engine in its own process the HTTP process's CPU is measured directly; in one
        # process only the difference to generate's CPU estimates it
        result["http_cpu_us_per_token"] = (1e6 * http["http_process_cpu_s"] / tokens if http["engine_in_child"]
                                           else result["http_cpu_us_per_token_by_difference"])
        result["server_cpu_us_per_token"] = 1e6 * http["server_cpu_s"] / max(1, http["output_tokens"])
        result["generate_cpu_us_per_token"] = 1e6 * gen["cpu_s"] / max(1, gen["output_tokens"])
        log(f"generate {gen['output_tok_s']:.0f} tok/s, http {http['output_tok_s']:.0f} tok/s "
            f"(ratio {result['ratio']:.3f}); HTTP path CPU {result['http_cpu_us_per_token']:.1f} us/token")
    write_json(args.out, result)


def _strip_out(argv: list[str]) -> list[str]:
    out = list(argv)
    if "--out" in out:
        i = out.index("--out")
        del out[i:i + 2]
    return out


if __name__ == "__main__":
    main()
