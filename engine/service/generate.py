"""`batchdeck generate`: serve a JSONL file of requests offline and write one result line each.

Input: one JSON object per line, UTF-8 (a byte-order mark at the start is allowed). Requests
without `arrival_time` are submitted at start in file order; the others when the engine clock
reaches their time (at most `MAX_ARRIVAL_AHEAD_S` after the start). Every bad line -- not UTF-8,
not JSON, nested too deeply, a number too long, a field out of range -- is reported on stderr with
its line number and skipped; the good ones are still served, and the exit status is 1.

Output: one line per served request, in input order. A result is written (and flushed) as soon as
it and every request before it in the file have finished, so the file grows during the run. An
interrupted run (Ctrl-C) writes every result that had finished, still in input order (later lines
may be missing, none is out of order), and exits with status 130.

Both files are opened before the model loads (`generate_files`): a directory, a missing input or
an output that cannot be opened for writing is a `GenerateError` naming `--input` / `--output`.
The output is emptied only when serving starts, so a failed start leaves an existing file as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, TextIO

from batchdeck.engine.llm_engine import LLMEngine
from batchdeck.engine.request import Request, RequestError
from batchdeck.engine.request_spec import MAX_ARRIVAL_AHEAD_S, RequestSpec, parse_request
from batchdeck.engine.service.progress import ProgressBar
from batchdeck.engine.tokenizer import Tokenizer

UTF8_BOM = b"\xef\xbb\xbf"
EXIT_INTERRUPTED = 130


class GenerateError(ValueError):
    """`--input` or `--output` cannot be used; the message names the flag and the path."""


class LineError(ValueError):
    """One input line cannot be served; the message says why (the caller adds file and line)."""


@dataclass
class InputLine:
    line_no: int
    spec: RequestSpec
    request: Request | None = None  # once submitted
    rejected: bool = False  # refused when submitted


# -- files ------------------------------------------------------------------------------------------

def open_input(path: str) -> BinaryIO:
    if os.path.isdir(path):
        raise GenerateError(f"--input {path!r} is a directory: give a JSONL file of requests")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise GenerateError(f"--input {path!r} cannot be read: {exc.strerror or exc}") from None


def open_output(path: str, input_path: str) -> TextIO:
    """Open `path` for results without emptying it yet (`run_generate` does, when serving starts)."""
    if os.path.isdir(path):
        raise GenerateError(f"--output {path!r} is a directory: give a file path for the results")
    with contextlib.suppress(OSError):
        if os.path.samefile(path, input_path):
            raise GenerateError(f"--output {path!r} is the --input file: writing results would overwrite the requests")
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise GenerateError(f"--output {path!r} cannot be opened for writing: {exc.strerror or exc}") from None


@contextlib.contextmanager
def generate_files(input_path: str, output_path: str) -> Iterator[tuple[BinaryIO, TextIO]]:
    """Both files, opened (and checked) before anything is loaded or served; closed on exit."""
    src = open_input(input_path)
    try:
        out = open_output(output_path, input_path)
    except BaseException:
        src.close()
        raise
    try:
        yield src, out
    finally:
        src.close()
        with contextlib.suppress(OSError):  # a failed write was reported already
            out.close()


# -- input ------------------------------------------------------------------------------------------

BLANK = object()  # what decode_line returns for a line with nothing on it (JSON `null` is a bad line)


def decode_line(raw: bytes) -> Any:
    """The JSON value of one line (BLANK for a blank line); LineError says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}") from None
    if not text.strip():
        return BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise LineError("malformed JSON: nested too deeply (a request is a flat object)") from None
    except ValueError:  # the only other one: an integer beyond Python's digit limit
        raise LineError(f"malformed JSON: a number has more than {sys.get_int_max_str_digits()} digits") from None


def read_requests(src: BinaryIO, name: str, tokenizer: Tokenizer, errors: TextIO) -> tuple[list[InputLine], int]:
    """Parse the input; returns the valid lines and how many were rejected (each reported)."""
    good: list[InputLine] = []
    rejected = 0
    seen: set[str] = set()
    for line_no, raw in enumerate(src, start=1):
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        try:
            obj = decode_line(raw)
            if obj is BLANK:
                continue
            spec = parse_request(obj, tokenizer, default_id=str(line_no), max_arrival_time=MAX_ARRIVAL_AHEAD_S)
            if spec.request_id in seen:
                raise RequestError(f"duplicate id {spec.request_id!r}")
        except (LineError, RequestError) as exc:
            rejected += 1
            errors.write(f"{name}:{line_no}: {exc}; line skipped\n")
            continue
        seen.add(spec.request_id)
        good.append(InputLine(line_no, spec))
    return good, rejected


# -- output -----------------------------------------------------------------------------------------

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
            "ttft": r.ttft,
            "tpot": r.tpot,
            "first_token_iteration": r.first_token_iteration,
            "finish_iteration": r.finish_iteration,
            "num_preemptions": r.num_preemptions,
            "num_cached_tokens": r.num_cached_tokens,
            "spec_proposed": r.spec_proposed,
            "spec_accepted": r.spec_accepted,
        },
    }


class ResultWriter:
    """Writes results in input order: a line goes out once it and every line before it are settled
    (finished, or refused at submission)."""

    def __init__(self, out: TextIO, name: str, tokenizer: Tokenizer, lines: list[InputLine],
                 simulated: str | None = None):
        self.out, self.name, self.tokenizer, self.lines = out, name, tokenizer, lines
        self.simulated = simulated  # a simulated engine's profile: every line names it
        self.next = 0  # index into lines of the first one not yet settled
        self.written = 0

    def start(self) -> None:
        """Empty an existing output file (opened without truncation, see open_output)."""
        try:
            if self.out.seekable():
                self.out.seek(0)
                self.out.truncate()
        except OSError as exc:
            raise GenerateError(f"--output {self.name!r} cannot be emptied: {exc.strerror or exc}") from None

    def advance(self) -> None:
        """Write every result whose turn has come."""
        batch = []
        while self.next < len(self.lines):
            ln = self.lines[self.next]
            if ln.request is not None and ln.request.is_finished:
                batch.append(ln.request)
            elif not ln.rejected:
                break
            self.next += 1
        self._write(batch)

    def write_finished(self) -> None:
        """After an interruption: every finished result not yet written, still in input order."""
        self.advance()
        self._write([ln.request for ln in self.lines[self.next:] if ln.request is not None and ln.request.is_finished])

    def _write(self, requests: list[Request]) -> None:
        if not requests:
            return
        try:
            for r in requests:
                line = output_line(r, self.tokenizer.decode(r.output_token_ids))
                if self.simulated is not None:
                    line["simulated"] = self.simulated
                self.out.write(json.dumps(line) + "\n")
            self.out.flush()
        except OSError as exc:
            raise GenerateError(f"--output {self.name!r}: cannot write results: {exc.strerror or exc}") from None
        self.written += len(requests)


# -- serving ----------------------------------------------------------------------------------------

def run_generate(engine: LLMEngine, src: BinaryIO, out: TextIO, *, input_name: str, output_name: str,
                 errors: TextIO | None = None, progress: bool | None = None) -> int:
    """Serve every valid line of `src`, writing results to `out` as they finish; the exit status."""
    errors = errors or sys.stderr
    tokenizer = engine.loaded.tokenizer
    lines, rejected = read_requests(src, input_name, tokenizer, errors)
    simulated = engine.simulation["profile"] if engine.simulation else None
    if simulated is not None:
        errors.write(f"generate: SIMULATED engine (profile {simulated}, {engine.simulation['device_name']}): "
                     "output tokens are stand-ins and timings come from the profile's cost model\n")
    writer = ResultWriter(out, output_name, tokenizer, lines, simulated)
    writer.start()
    pending = sorted(lines, key=lambda ln: (ln.spec.arrival_time or 0.0, ln.line_no))
    bar = ProgressBar(len(lines), "generate", errors, progress)
    finished = 0
    engine.restart_clock()
    next_i = 0
    try:
        while next_i < len(pending) or engine.has_unfinished:
            now = engine.clock()
            while next_i < len(pending) and (pending[next_i].spec.arrival_time or 0.0) <= now:
                ln = pending[next_i]
                next_i += 1
                s = ln.spec
                try:
                    ln.request = engine.add_request(s.request_id, s.prompt_token_ids, s.sampling,
                                                    arrival_time=s.arrival_time if s.arrival_time is not None else now,
                                                    tenant=s.tenant, priority=s.priority, slo_class=s.slo_class)
                except RequestError as exc:
                    ln.rejected = True
                    rejected += 1
                    errors.write(f"{input_name}:{ln.line_no}: {exc}; line skipped\n")
            result = engine.step()
            if result is None:
                waits = [engine.scheduler.pending_static_wait(now)]
                if next_i < len(pending):
                    waits.append((pending[next_i].spec.arrival_time or 0.0) - now)
                wait = min(w for w in waits if w is not None) if any(w is not None for w in waits) else 0.001
                engine.sleep(min(max(wait, 0.0), 0.05) + 1e-4)
            else:
                finished += len(result.finished)
            writer.advance()
            bar.update(finished)
    except KeyboardInterrupt:
        bar.close()
        writer.write_finished()
        unfinished = sum(1 for ln in lines if not ln.rejected and not (ln.request and ln.request.is_finished))
        errors.write(f"interrupted: {writer.written} finished result(s) written to {output_name} in input order; "
                     f"{unfinished} request(s) not finished\n")
        return EXIT_INTERRUPTED
    writer.advance()
    bar.update(finished, force=True)
    bar.close()
    if rejected:
        errors.write(f"{rejected} request(s) rejected; {writer.written} served and written to {output_name}\n")
    return 1 if rejected else 0
