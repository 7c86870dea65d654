"""The OpenAI completions and chat endpoints over an `AsyncEngine`.

One HTTP request becomes one engine request per (prompt, choice); engine request ids are
`<response id>-<choice index>`, so a response's `id` finds its requests in the engine's telemetry.
Nothing here runs model work: requests, aborts and config changes are commands the engine's worker
thread executes at its next iteration boundary, and outputs come back once per iteration.

Choice `i` of a seeded request samples with seed `seed + i`: every choice is reproducible across
calls and the choices differ from one another. A stop string ends the choice with finish_reason
"stop" (the engine request is finished at the next boundary with the same reason); a client that
goes away has its unfinished requests aborted the same way (reason "abort"), returning their KV blocks.

Streams send one chunk per iteration that produced tokens for a choice, even when its text is empty
(an unfinished multi-byte character, or text held back because it may begin a stop string), so
clients measure TTFT and inter-token gaps at the engine's pace, as they do against vLLM.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from batchdeck.engine.request import QueueFullError, RequestError, SamplingParams
from batchdeck.engine.service.async_engine import AsyncEngine, RequestStream
from batchdeck.engine.service.http.chat import chat_messages, chat_prompt_ids
from batchdeck.engine.service.http.detokenizer import IncrementalDetokenizer
from batchdeck.engine.service.http.errors import (OpenAIError, bad_request, engine_dead, model_not_found,
                                                  unavailable)
from batchdeck.engine.service.served_model import EngineDeadError
from batchdeck.engine.service.http.protocol import ChatCompletionRequest, CompletionRequest, _Sampling

# Fields the engine cannot honour: refused with a 400 instead of silently ignored.
_UNSUPPORTED = (("echo", lambda r: getattr(r, "echo", False), "echo is not supported"),
                ("suffix", lambda r: getattr(r, "suffix", None), "suffix is not supported"),
                ("best_of", lambda r: getattr(r, "best_of", None) not in (None, r.n),
                 "best_of other than n is not supported"),
                ("logit_bias", lambda r: r.logit_bias, "logit_bias is not supported"),
                ("presence_penalty", lambda r: r.presence_penalty, "presence_penalty is not supported (use 0)"),
                ("frequency_penalty", lambda r: r.frequency_penalty, "frequency_penalty is not supported (use 0)"),
                ("top_logprobs", lambda r: getattr(r, "top_logprobs", None) and not r.logprobs,
                 "top_logprobs needs logprobs: true"),
                ("tools", lambda r: getattr(r, "tools", None) or getattr(r, "functions", None),
                 "tool calling is not supported: tools are neither shown to the model nor parsed from its reply"),
                ("tool_choice", lambda r: getattr(r, "tool_choice", None) not in (None, "none", "auto")
                 or getattr(r, "function_call", None) not in (None, "none", "auto"),
                 "tool_choice other than none or auto is not supported (no tool calling)"),
                ("response_format", lambda r: getattr(r, "response_format", None) not in (None, {"type": "text"}),
                 "response_format other than {\"type\": \"text\"} is not supported: the output is not "
                 "constrained"),
                ("stream_options", lambda r: r.stream_options is not None and not r.stream,
                 "stream_options is only allowed with stream: true"))

# Words that start an engine RequestError's message and name the field it is about.
_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "priority", "slo_class",
           "stop_token_ids", "prompt")


@dataclass
class _Choice:
    index: int
    request_id: str
    stream: RequestStream
    detok: IncrementalDetokenizer
    num_tokens: int = 0
    finish_reason: str | None = None
    lp_ids: list[int] = field(default_factory=list)  # tokens and their logprobs, when the request asked
    lp_values: list[float | None] = field(default_factory=list)
    lp_tops: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # when the request asked
    lp_sent: int = 0  # how many of them a stream has sent
    logprobs: bool = False


@dataclass
class _Job:
    """The engine requests behind one HTTP request."""

    id: str
    created: int
    prompt_tokens: int
    choices: list[_Choice] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, with logprobs

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


_PLAIN = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII but '"' and '\\': its JSON string is itself in quotes


def json_string(text: str) -> str:
    """json.dumps(text) (ASCII-escaped, as json.dumps writes it), without the encoder for plain text."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def completion_prompts(prompt: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """A completions `prompt` as token id lists (400 naming what is wrong)."""
    def ids(value: list, where: str) -> list[int]:
        for i, t in enumerate(value):
            if isinstance(t, bool) or not isinstance(t, int):
                raise bad_request(f"{where}[{i}] must be a token id (an integer), got {t!r}", "prompt")
            if not 0 <= t < vocab_size:
                raise bad_request(f"{where}[{i}] = {t} is outside the vocabulary [0, {vocab_size - 1}]", "prompt")
        return list(value)

    if prompt is None:
        raise bad_request("prompt is required: a string, a list of strings, a list of token ids, or a list of "
                          "such lists", "prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of such "
                          "lists (not empty)", "prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [ids(prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of such lists; "
                      "do not mix them", "prompt")


class OpenAIServing:
    """`engine`: an AsyncEngine, or an EngineProcess (engine/service/engine_process.py): the same
    add_request / abort / error / clock / served_model, with the engine in another process."""

    def __init__(self, engine: AsyncEngine, served_model_name: str, *, is_draining: Callable[[], bool] = lambda: False):
        self.engine = engine
        served = engine.served_model()
        self.clock = engine.clock  # the engine's clock, as add_request's arrival_time takes it
        self.model_name = served_model_name
        self.tokenizer = served.tokenizer
        self.vocab_size = served.vocab_size
        self.max_model_len = served.max_model_len
        self.is_draining = is_draining
        self._background: set[asyncio.Task] = set()

    # -- shared --------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name, self.model_name)

    def check_serving(self) -> None:
        if self.is_draining():
            raise unavailable("the server is shutting down and takes no new requests")
        if self.engine.error is not None:
            raise engine_dead(self.engine.error)

    def _sampling(self, req: _Sampling, max_tokens: int, choice: int, job: _Job) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(0, req.top_k), seed=None if req.seed is None else req.seed + choice,
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                              min_tokens=req.min_tokens, logprobs=job.logprobs, top_logprobs=job.top_logprobs)

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} "
                              f"tokens, so a prompt may have at most {self.max_model_len - 1}", prompt_param,
                              "context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise bad_request(f"{param} = {requested} does not fit: this model's context is {self.max_model_len} "
                              f"tokens and the prompt has {prompt_len}, so {param} may be at most {room}", param,
                              "context_length_exceeded")
        return requested

    async def _start(self, job: _Job, req: _Sampling, prompts: Sequence[list[int]], max_tokens: Sequence[int],
                     arrival: float) -> None:
        """Add every (prompt, choice) request; if one is refused, abort the others and raise."""
        stops = req.stop_strings()
        wanted = [(p * req.n + c, ids, self._sampling(req, max_tokens[p], c, job))
                  for p, ids in enumerate(prompts) for c in range(req.n)]
        # all at once: the adds run together at the next iteration boundary
        added = await asyncio.gather(*(
            self.engine.add_request(f"{job.id}-{index}", ids, sampling, arrival_time=arrival,
                                    tenant=req.tenant_name(), priority=req.priority, slo_class=req.slo_class)
            for index, ids, sampling in wanted), return_exceptions=True)
        for (index, _, _), stream in zip(wanted, added):
            if not isinstance(stream, BaseException):
                job.choices.append(_Choice(index, f"{job.id}-{index}", stream,
                                           IncrementalDetokenizer(self.tokenizer, stops, req.min_tokens),
                                           logprobs=job.logprobs))
        error = next((e for e in added if isinstance(e, BaseException)), None)
        if error is None:
            return
        self._abort_all(job)
        if isinstance(error, EngineDeadError):
            raise engine_dead(error) from None
        if isinstance(error, QueueFullError):
            if len(wanted) > error.max_waiting:  # would never fit: retrying cannot help
                raise bad_request(f"this request needs {len(wanted)} places in the waiting queue ({len(prompts)} "
                                  f"prompt(s) x n = {req.n}) but max_waiting is {error.max_waiting}: lower n or "
                                  "send fewer prompts per request", "n") from None
            raise unavailable(str(error)) from None
        if isinstance(error, RequestError):
            message = str(error)
            param = next((f for f in _FIELDS if message.startswith(f)), None)
            if param == "seed":  # choice i samples with seed + i: say so, the client sent `seed`
                message = (f"seed + choice index must stay below 2**63 (choice i samples with seed + i): seed "
                           f"{req.seed} with n = {req.n} gives {req.seed + req.n - 1}")
            raise bad_request(message, param) from None
        raise error

    def _abort_all(self, job: _Job, reason: str = "abort") -> None:
        """Abort the job's unfinished requests at the next boundary (safe while being cancelled)."""
        for c in job.choices:
            if c.finish_reason is None:
                c.finish_reason = reason
                self._spawn(self.engine.abort(c.request_id, reason))

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _step(self, choice: _Choice, out: Any) -> tuple[_Choice, str, str | None] | None:
        """One engine output of a choice as (choice, new text, finish_reason or None); None: nothing to send."""
        choice.num_tokens += len(out.new_token_ids)
        if choice.logprobs and choice.detok.stopped is None and out.new_token_ids:
            choice.lp_ids.extend(out.new_token_ids)
            choice.lp_values.extend(out.logprobs or [None] * len(out.new_token_ids))
            choice.lp_tops.extend(out.top_logprobs or [()] * len(out.new_token_ids))
        text = choice.detok.add(out.new_token_ids) if out.new_token_ids else ""
        if choice.detok.stopped is not None:
            choice.finish_reason = "stop"
            self._spawn(self.engine.abort(choice.request_id, "stop"))
            return choice, text, "stop"
        if out.finished:
            choice.finish_reason = out.finish_reason or "stop"
            return choice, text + choice.detok.flush(), choice.finish_reason
        if out.new_token_ids:  # text may be "" (held back): the chunk still marks the tokens' arrival
            return choice, text, None
        return None

    async def _events(self, job: _Job) -> AsyncIterator[tuple[_Choice, str, str | None]]:
        """(choice, new text, finish_reason or None) as outputs arrive, from every choice, until all finish."""
        try:
            if len(job.choices) == 1:  # the common case: read the one stream directly (no task, no queue)
                choice = job.choices[0]
                async for out in choice.stream:
                    item = self._step(choice, out)
                    if item is not None:
                        yield item
                        if item[2] is not None:
                            return
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(choice: _Choice) -> None:
                try:
                    async for out in choice.stream:
                        item = self._step(choice, out)
                        if item is not None:
                            queue.put_nowait(item)
                            if item[2] is not None:
                                return
                except Exception as exc:  # noqa: BLE001 - raised by the reader below (EngineDeadError)
                    queue.put_nowait(exc)
                finally:
                    queue.put_nowait(None)

            pumps = [asyncio.ensure_future(pump(c)) for c in job.choices]
            open_pumps = len(pumps)
            try:
                while open_pumps:
                    item = await queue.get()
                    if item is None:
                        open_pumps -= 1
                        continue
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                for t in pumps:
                    t.cancel()
        finally:
            self._abort_all(job)  # a client that went away: nothing left running for it

    async def _until_disconnect(self, job_coro: Awaitable[Any], disconnected: Callable[[], Awaitable[None]],
                                job: _Job) -> Any:
        """Run a non-streaming job; if the client goes away first, abort its requests."""
        work = asyncio.ensure_future(job_coro)
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work in done:
            try:
                return work.result()
            except EngineDeadError as exc:
                raise engine_dead(exc) from None
        work.cancel()
        self._abort_all(job)
        raise OpenAIError(499, "the client closed the connection", None, "client_closed_request")

    def _check_request(self, req: _Sampling) -> None:
        self.check_serving()
        self.check_model(req.model)
        for param, is_set, why in _UNSUPPORTED:
            if is_set(req):
                raise bad_request(why, param)

    # -- logprobs: the sampled token's, and the most likely tokens' when asked -----------------
    def _token_texts(self, choice: _Choice, start: int) -> list[str]:
        return [self.tokenizer.decode([t]) for t in choice.lp_ids[start:]]

    def _completion_logprobs(self, choice: _Choice, text_offset: int, start: int = 0) -> dict[str, Any]:
        """OpenAI's legacy form: `top_logprobs` per token maps text to log-probability for the `logprobs`
        most likely tokens and the sampled one (so up to logprobs + 1 entries, as OpenAI and vLLM give)."""
        tokens = self._token_texts(choice, start)
        offsets = []
        for t in tokens:
            offsets.append(text_offset)
            text_offset += len(t)
        tops = []
        for text, value, alternatives in zip(tokens, choice.lp_values[start:], choice.lp_tops[start:]):
            top = {self.tokenizer.decode([t]): lp for t, lp in alternatives}
            top.setdefault(text, value)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": choice.lp_values[start:], "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_logprobs(self, choice: _Choice, start: int) -> dict[str, Any]:
        def entry(text: str, value: float | None) -> dict[str, Any]:
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(t, v), "top_logprobs": [entry(self.tokenizer.decode([a]), lp) for a, lp in tops]}
                            for t, v, tops in zip(self._token_texts(choice, start), choice.lp_values[start:],
                                                  choice.lp_tops[start:])]}

    # -- /v1/completions -----------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, disconnected: Callable[[], Awaitable[None]],
                          arrival: float | None = None) -> dict[str, Any] | AsyncIterator[str]:
        """`arrival`: engine time the HTTP request came in (default: now)."""
        arrival = self.clock() if arrival is None else arrival
        self._check_request(req)
        prompts = completion_prompts(req.prompt, self.tokenizer, self.vocab_size)
        limits = [self._max_tokens(req.max_tokens, len(p), "max_tokens", "prompt") for p in prompts]
        job = _Job(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), sum(len(p) for p in prompts),
                   logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0)
        await self._start(job, req, prompts, limits, arrival)
        if req.stream:
            return self._stream_completion(job, req.include_usage)
        return await self._until_disconnect(self._collect_completion(job), disconnected, job)

    def _completion_head(self, job: _Job) -> dict[str, Any]:
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": self.model_name}

    async def _collect_completion(self, job: _Job) -> dict[str, Any]:
        texts = {c.index: "" for c in job.choices}
        async for choice, text, _ in self._events(job):
            texts[choice.index] += text
        choices = [{"index": c.index, "text": texts[c.index],
                    "logprobs": self._completion_logprobs(c, 0) if job.logprobs else None,
                    "finish_reason": c.finish_reason} for c in job.choices]
        return {**self._completion_head(job), "choices": choices, "usage": job.usage()}

    async def _stream_completion(self, job: _Job, include_usage: bool) -> AsyncIterator[str]:
        head = self._completion_head(job)
        # each chunk is the same JSON as sse({...}) would give, formatted around the pre-encoded head
        prefix = "data: " + json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        suffix = "}]" + (',"usage":null' if include_usage else "") + "}\n\n"
        offsets = {c.index: 0 for c in job.choices}
        try:
            async for choice, text, finish in self._events(job):
                if job.logprobs:  # the generic (slower) form, with this chunk's tokens and their logprobs
                    extra = {"usage": None} if include_usage else {}
                    lp = self._completion_logprobs(choice, offsets[choice.index], choice.lp_sent)
                    choice.lp_sent = len(choice.lp_ids)
                    offsets[choice.index] += len(text)
                    yield sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": lp,
                                                    "finish_reason": finish}], **extra})
                    continue
                yield (f'{prefix}{choice.index},"text":{json_string(text)},"logprobs":null,"finish_reason":'
                       f'{"null" if finish is None else json_string(finish)}{suffix}')
        except EngineDeadError as exc:  # mid-stream the status went out long ago: an error event ends it
            yield sse(engine_dead(exc).body())
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, disconnected: Callable[[], Awaitable[None]],
                   arrival: float | None = None) -> dict[str, Any] | AsyncIterator[str]:
        arrival = self.clock() if arrival is None else arrival
        self._check_request(req)
        ids = chat_prompt_ids(self.tokenizer, chat_messages(req.messages))
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = self._max_tokens(req.max_completion_tokens if req.max_completion_tokens is not None
                                 else req.max_tokens, len(ids), param, "messages")
        job = _Job(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), len(ids), logprobs=req.logprobs,
                   top_logprobs=req.top_logprobs or 0)
        await self._start(job, req, [ids], [limit], arrival)
        if req.stream:
            return self._stream_chat(job, req.include_usage)
        return await self._until_disconnect(self._collect_chat(job), disconnected, job)

    def _chat_head(self, job: _Job, obj: str) -> dict[str, Any]:
        return {"id": job.id, "object": obj, "created": job.created, "model": self.model_name}

    async def _collect_chat(self, job: _Job) -> dict[str, Any]:
        texts = {c.index: "" for c in job.choices}
        async for choice, text, _ in self._events(job):
            texts[choice.index] += text
        choices = [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
                    "logprobs": self._chat_logprobs(c, 0) if job.logprobs else None,
                    "finish_reason": c.finish_reason} for c in job.choices]
        return {**self._chat_head(job, "chat.completion"), "choices": choices, "usage": job.usage()}

    async def _stream_chat(self, job: _Job, include_usage: bool) -> AsyncIterator[str]:
        head = self._chat_head(job, "chat.completion.chunk")
        extra = {"usage": None} if include_usage else {}
        for c in job.choices:
            yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra})
        prefix = "data: " + json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        suffix = "}]" + (',"usage":null' if include_usage else "") + "}\n\n"
        try:
            async for choice, text, finish in self._events(job):
                if job.logprobs:
                    lp = self._chat_logprobs(choice, choice.lp_sent)
                    choice.lp_sent = len(choice.lp_ids)
                    yield sse({**head, "choices": [{"index": choice.index, "delta": {"content": text}, "logprobs": lp,
                                                    "finish_reason": finish}], **extra})
                    continue
                yield (f'{prefix}{choice.index},"delta":{{"content":{json_string(text)}}},"logprobs":null,'
                       f'"finish_reason":{"null" if finish is None else json_string(finish)}{suffix}')
        except EngineDeadError as exc:
            yield sse(engine_dead(exc).body())
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
