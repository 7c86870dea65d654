"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Bad input is always a 4xx naming the field; nothing a client sends can produce a 500.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchdeck.engine.service.served_model import EngineDeadError


@dataclass
class OpenAIError(Exception):
    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code=code)


def model_not_found(name: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                       code="invalid_api_key")


def unavailable(message: str, retry_after_s: int = 1) -> OpenAIError:
    return OpenAIError(503, message, None, type="server_error", code="service_unavailable",
                       headers={"Retry-After": str(retry_after_s)})


def engine_dead(error: BaseException) -> OpenAIError:
    """The engine can no longer serve (its process ended, or a step failed): 503, no Retry-After; the
    message names the failure as EngineDeadError.of does, wherever the engine runs."""
    return OpenAIError(503, EngineDeadError.of(error).describe(), None, type="server_error",
                       code="engine_failed")
