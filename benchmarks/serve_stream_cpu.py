"""CPU per streamed token of the HTTP process's own streaming path, without sockets or an engine:
`--streams` streaming /v1/completions jobs (OpenAIServing) fed by an engine stand-in that hands out
one output per stream per iteration, the way an engine process's batched message arrives
(`deliver_outputs` of engine/service/async_engine.py, as EngineProcess uses it); every SSE chunk is
produced and dropped. Deterministic enough to compare code changes on a busy CPU, which the whole
server's CPU (benchmarks/gpu_serve.py) is not.

    python benchmarks/serve_stream_cpu.py --streams 256 --tokens 256 --repeat 5 --out /tmp/stream_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_common import command_line, write_json  # noqa: E402


class StandInEngine:
    """What OpenAIServing uses of an engine; outputs come from `iteration()`."""

    def __init__(self, vocab_size: int = 256, max_model_len: int = 4096):
        from batchdeck.engine.service.served_model import ServedModel
        from batchdeck.engine.tokenizer import ByteTokenizer

        self._served = ServedModel("bench", ByteTokenizer(), vocab_size, max_model_len, "fcfs", 0)
        self.streams: dict = {}
        self.error = None
        self.finished_observers: list = []

    def clock(self) -> float:
        return time.monotonic()

    def served_model(self):
        return self._served

    async def add_request(self, request_id, prompt_token_ids, sampling=None, **kwargs):
        from batchdeck.engine.service.async_engine import RequestStream

        stream = self.streams[request_id] = RequestStream(request_id)
        return stream

    async def abort(self, request_id: str, reason: str = "abort") -> bool:
        return self.streams.pop(request_id, None) is not None

    def iteration(self, outputs: list[tuple]) -> None:
        from itertools import starmap

        from batchdeck.engine.llm_engine import RequestOutput
        from batchdeck.engine.service.async_engine import deliver_outputs

        deliver_outputs(self.streams, starmap(RequestOutput, outputs))


async def run_once(streams: int, tokens: int) -> tuple[float, int]:
    from batchdeck.engine.service.http.protocol import CompletionRequest
    from batchdeck.engine.service.http.serving import OpenAIServing

    engine = StandInEngine()
    serving = OpenAIServing(engine, "bench")

    async def never() -> None:
        await asyncio.Event().wait()

    gens = []
    for i in range(streams):
        req = CompletionRequest.model_validate({"model": "bench", "prompt": [65 + i % 26] * 8, "max_tokens": tokens,
                                                "stream": True, "stream_options": {"include_usage": True}})
        gens.append(await serving.completions(req, never))
    chunks = 0

    async def consume(gen) -> None:
        nonlocal chunks
        async for _ in gen:
            chunks += 1

    consumers = [asyncio.ensure_future(consume(g)) for g in gens]
    await asyncio.sleep(0)
    ids = sorted(engine.streams)
    text = "Hello, wörld! "  # ASCII and a two-byte character, as bytes
    data = list(text.encode())
    cpu0 = time.process_time()
    for step in range(tokens):
        done = step == tokens - 1
        engine.iteration([(rid, [data[(step + k) % len(data)]], done, "length" if done else None, None)
                          for k, rid in enumerate(ids)])
        await asyncio.sleep(0)  # the loop runs every stream's step, as between two engine messages
    await asyncio.gather(*consumers)
    return time.process_time() - cpu0, streams * tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    runs = []
    for _ in range(args.repeat):
        cpu, n = asyncio.run(run_once(args.streams, args.tokens))
        runs.append(1e6 * cpu / n)
        print(f"{runs[-1]:.2f} us CPU per streamed token ({n} tokens)", flush=True)
    result = {"command": command_line("benchmarks/serve_stream_cpu.py"), "args": vars(args),
              "us_per_token": runs, "best_us_per_token": min(runs)}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
