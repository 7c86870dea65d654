"""Parsing one request object (a `batchdeck generate` input line, an MQTT `submit`) into engine terms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchdeck.engine.request import SLO_CLASSES, RequestError, SamplingParams
from batchdeck.engine.tokenizer import Tokenizer

KNOWN_KEYS = {"id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "stop_token_ids", "ignore_eos", "arrival_time", "tenant", "priority", "slo_class"}


@dataclass
class RequestSpec:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float | None
    tenant: str
    priority: int
    slo_class: str


def _number(obj: dict, key: str, default: Any, kind: type, low: float | None = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if low is not None and value < low:
        raise RequestError(f"{key} must be >= {low}, got {value!r}")
    return kind(value)


def parse_request(obj: Any, tokenizer: Tokenizer, default_id: str, default_max_tokens: int = 16) -> RequestSpec:
    """Validate a request object; RequestError names the offending field and what is allowed."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: allowed " + ", ".join(sorted(KNOWN_KEYS)))
    rid = obj.get("id", default_id)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise RequestError(f"id must be a string or integer, got {rid!r}")
    if "prompt" in obj and "prompt_token_ids" in obj:
        raise RequestError("give either prompt or prompt_token_ids, not both")
    if "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt_token_ids must be a list of integers")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise RequestError(f"prompt must be a string, got {type(obj['prompt']).__name__}")
        ids = tokenizer.encode(obj["prompt"])
    else:
        raise RequestError("missing prompt (text) or prompt_token_ids")
    stop = obj.get("stop_token_ids", [])
    if not isinstance(stop, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
        raise RequestError("stop_token_ids must be a list of integers")
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {ignore_eos!r}")
    seed = obj.get("seed")
    if seed is not None:
        seed = _number(obj, "seed", None, int, 0)
    sampling = SamplingParams(
        max_tokens=_number(obj, "max_tokens", default_max_tokens, int),
        temperature=_number(obj, "temperature", 0.0, float, 0.0),
        top_p=_number(obj, "top_p", 1.0, float),
        top_k=_number(obj, "top_k", 0, int, 0),
        seed=seed,
        stop_token_ids=tuple(stop),
        ignore_eos=ignore_eos,
    )
    sampling.validate()
    arrival = obj.get("arrival_time")
    if arrival is not None:
        arrival = _number(obj, "arrival_time", None, float, 0.0)
    tenant = obj.get("tenant", "default")
    if not isinstance(tenant, str) or not tenant:
        raise RequestError(f"tenant must be a non-empty string, got {tenant!r}")
    slo_class = obj.get("slo_class", "interactive")
    if slo_class not in SLO_CLASSES:
        raise RequestError(f"slo_class {slo_class!r} is not one of " + ", ".join(SLO_CLASSES))
    return RequestSpec(str(rid), list(ids), sampling, arrival, tenant, _number(obj, "priority", 0, int), slo_class)
