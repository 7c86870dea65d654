"""Run by tests/test_fused_interpreter.py in a child process with TRITON_INTERPRET=1 (the variable must
be set before the fused kernels are defined): greedy tokens and log-probabilities of the engine on the
CPU with stock modules and the torch backend, against the Triton backend with each BATCHDECK_FUSED level.
Prints one JSON line: {level: [tokens, logprobs]}."""
from __future__ import annotations

import json
import os
import random
import sys

from batchdeck.engine.attention.triton_backend import TritonBackend
from batchdeck.engine.config import EngineConfig, LiveConfig
from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.models import load_model
from batchdeck.engine.request import SamplingParams


def run(model: str, level: str | None):
    lm = load_model(model, "cpu", "float32")
    cfg = EngineConfig(model=model, device="cpu", dtype="float32", num_blocks=128, block_size=16,
                       max_num_seqs_limit=8, max_batched_tokens_limit=64, cuda_graphs=False)
    engine = LLMEngine(cfg, LiveConfig(max_num_seqs=4, max_batched_tokens=32, chunk_size=16), loaded=lm)
    if level is not None:
        from batchdeck.engine.triton_fused import fuse_model

        os.environ["BATCHDECK_FUSED"] = level
        fuse_model(lm.model)
        backend = TritonBackend()
        backend.num_sms = 4  # a few rows split their keys, as small batches do on a GPU
        engine.runner.backend = engine.backend = backend
    rng = random.Random(3)
    for i in range(4):
        engine.add_request(str(i), [rng.randrange(256) for _ in range(rng.randint(1, 40))],
                           SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True))
    logprobs: dict[str, list[float]] = {}
    while engine.has_unfinished:
        result = engine.step()
        for out in result.outputs if result else ():
            logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
    return [engine.requests[str(i)].output_token_ids for i in range(4)], logprobs


if __name__ == "__main__":
    name = sys.argv[1]
    print(json.dumps({str(lv): run(name, lv) for lv in (None, "1", "2", "3")}))
