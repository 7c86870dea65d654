"""Parsing one request object (a `batchdeck generate` input line, an MQTT `submit`) into engine terms.

`parse_request` checks shapes (types, which keys) and `SamplingParams.validate` /
`check_request_fields` check values, so every entry point refuses the same values with the same
message: the field's name, the allowed range and the value given. Nothing here raises anything but
RequestError: huge integers, NaN and infinities, lone surrogates are all refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchdeck.engine.request import (MAX_ID_CHARS, RequestError, SamplingParams, check_request_fields, check_text,
                                      show_value)
from batchdeck.engine.tokenizer import Tokenizer

KNOWN_KEYS = {"id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "stop_token_ids", "ignore_eos", "arrival_time", "tenant", "priority", "slo_class"}
MAX_ARRIVAL_AHEAD_S = 3600.0  # the furthest a request may be scheduled ahead (generate: of the run's start)


@dataclass
class RequestSpec:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float | None
    tenant: str
    priority: int
    slo_class: str


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _integer(obj: dict, key: str, default: Any) -> Any:
    """An integer field (an integral JSON float like 5.0 counts); its range is checked by the caller."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {show_value(value)}")
    return value


def _real(obj: dict, key: str, default: Any) -> Any:
    """A number field; NaN, infinities and integers too large for a float are left to the range check."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {show_value(value)}")
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return value  # the range check names it
    return value


def _token_ids(obj: dict, key: str) -> list[int]:
    ids = obj[key]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"{key} must be a list of integers")
    return ids


def parse_request(obj: Any, tokenizer: Tokenizer, default_id: str, default_max_tokens: int = 16,
                  max_arrival_time: float | None = None) -> RequestSpec:
    """Validate a request object; RequestError names the offending field and what is allowed.

    `max_arrival_time` bounds `arrival_time` (generate passes MAX_ARRIVAL_AHEAD_S: its clock starts at 0).
    """
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise RequestError(f"unknown field {show_value(unknown[0])}: allowed " + ", ".join(sorted(KNOWN_KEYS)))
    rid = obj.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        if len(str(abs(rid))) > MAX_ID_CHARS:  # ints of this size always fit str() (JSON caps digits lower)
            raise RequestError(f"id has {len(str(abs(rid)))} digits; at most {MAX_ID_CHARS} characters are allowed")
        rid = str(rid)
    if not isinstance(rid, str):
        raise RequestError(f"id must be a string or integer, got {show_value(rid)}")
    if "prompt" in obj and "prompt_token_ids" in obj:
        raise RequestError("give either prompt or prompt_token_ids, not both")
    if "prompt_token_ids" in obj:
        ids = _token_ids(obj, "prompt_token_ids")
    elif "prompt" in obj:
        ids = tokenizer.encode(check_text("prompt", obj["prompt"]))
    else:
        raise RequestError("missing prompt (text) or prompt_token_ids")
    stop = _token_ids(obj, "stop_token_ids") if "stop_token_ids" in obj else []
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {show_value(ignore_eos)}")
    sampling = SamplingParams(
        max_tokens=_integer(obj, "max_tokens", default_max_tokens),
        temperature=_real(obj, "temperature", 0.0),
        top_p=_real(obj, "top_p", 1.0),
        top_k=_integer(obj, "top_k", 0),
        seed=_integer(obj, "seed", None),
        stop_token_ids=tuple(stop),
        ignore_eos=ignore_eos,
    )
    sampling.validate()
    arrival = _real(obj, "arrival_time", None)
    if arrival is not None:
        high = max_arrival_time if max_arrival_time is not None else math.inf
        if not (isinstance(arrival, float) and math.isfinite(arrival) and 0.0 <= arrival <= high):
            allowed = f"in [0, {high:g}] seconds after the start" if high < math.inf else "a finite number >= 0"
            raise RequestError(f"arrival_time must be {allowed}, got {show_value(arrival)}")
    tenant = obj.get("tenant", "default")
    priority = _integer(obj, "priority", 0)
    slo_class = obj.get("slo_class", "interactive")
    check_request_fields(rid, tenant, priority, slo_class)
    return RequestSpec(rid, list(ids), sampling, arrival, tenant, priority, slo_class)

