"""`batchdeck generate`: serve a JSONL file of requests offline and write one result line each.

Requests without `arrival_time` are submitted at start in file order; the others when the engine
clock reaches their time. Bad lines are reported on stderr with their line number and skipped;
the good ones are still served and written, and the exit status is 1.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.service.progress import ProgressBar
from batchdeck.engine.request import Request, RequestError
from batchdeck.engine.request_spec import RequestSpec, parse_request


@dataclass
class InputLine:
    line_no: int
    spec: RequestSpec


def read_requests(path: str, engine: LLMEngine, errors: TextIO) -> tuple[list[InputLine], int]:
    """Parse the input file; returns the valid lines and how many were rejected (reported)."""
    good: list[InputLine] = []
    rejected = 0
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                rejected += 1
                errors.write(f"{path}:{line_no}: malformed JSON: {exc.msg} (column {exc.colno}); line skipped\n")
                continue
            try:
                spec = parse_request(obj, engine.loaded.tokenizer, default_id=str(line_no))
                if spec.request_id in seen:
                    raise RequestError(f"duplicate id {spec.request_id!r}")
                seen.add(spec.request_id)
            except RequestError as exc:
                rejected += 1
                errors.write(f"{path}:{line_no}: {exc}; line skipped\n")
                continue
            good.append(InputLine(line_no, spec))
    return good, rejected


def output_line(r: Request, text: str) -> dict:
    return {
        "id": r.request_id,
        "prompt_token_ids": r.prompt_token_ids,
        "output_token_ids": r.output_token_ids,
        "text": text,
        "finish_reason": r.finish_reason.value if r.finish_reason else "abort",
        "metrics": {
            "arrival": r.arrival_time,
            "first_token": r.first_token_time,
            "finish": r.finish_time,
            "ttft": None if r.first_token_time is None else r.first_token_time - r.arrival_time,
            "tpot": (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) if len(r.token_times) > 1 else None,
            "first_token_iteration": r.first_token_iteration,
            "finish_iteration": r.finish_iteration,
            "num_preemptions": r.num_preemptions,
            "spec_proposed": r.spec_proposed,
            "spec_accepted": r.spec_accepted,
        },
    }


def run_generate(engine: LLMEngine, input_path: str, output_path: str, errors: TextIO | None = None,
                 progress: bool | None = None) -> int:
    errors = errors or sys.stderr
    lines, rejected = read_requests(input_path, engine, errors)
    pending = sorted(lines, key=lambda ln: (ln.spec.arrival_time or 0.0, ln.line_no))
    served: list[tuple[InputLine, Request]] = []
    bar = ProgressBar(len(lines), "generate", errors, progress)
    engine.restart_clock()
    next_i = 0
    while next_i < len(pending) or engine.has_unfinished:
        now = engine.clock()
        while next_i < len(pending) and (pending[next_i].spec.arrival_time or 0.0) <= now:
            ln = pending[next_i]
            next_i += 1
            s = ln.spec
            try:
                req = engine.add_request(s.request_id, s.prompt_token_ids, s.sampling,
                                         arrival_time=s.arrival_time if s.arrival_time is not None else now,
                                         tenant=s.tenant, priority=s.priority, slo_class=s.slo_class)
            except RequestError as exc:
                rejected += 1
                errors.write(f"{input_path}:{ln.line_no}: {exc}; line skipped\n")
                continue
            served.append((ln, req))
        if engine.step() is None:
            waits = [engine.scheduler.pending_static_wait(now)]
            if next_i < len(pending):
                waits.append((pending[next_i].spec.arrival_time or 0.0) - now)
            wait = min(w for w in waits if w is not None) if any(w is not None for w in waits) else 0.001
            time.sleep(min(max(wait, 0.0), 0.05) + 1e-4)
        bar.update(sum(1 for _, r in served if r.is_finished))
    bar.update(len(served), force=True)
    bar.close()
    served.sort(key=lambda pair: pair[0].line_no)
    tokenizer = engine.loaded.tokenizer
    with open(output_path, "w", encoding="utf-8") as out:
        for _, r in served:
            out.write(json.dumps(output_line(r, tokenizer.decode(r.output_token_ids))) + "\n")
    if rejected:
        errors.write(f"{rejected} request(s) rejected; {len(served)} served and written to {output_path}\n")
    return 1 if rejected else 0
