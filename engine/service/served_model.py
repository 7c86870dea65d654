"""`ServedModel`: what the HTTP server needs to know of the engine's model, wherever the engine runs
(in this process, or in its own: engine/service/engine_process.py). Picklable: an engine process
sends it, tokenizer included, once its model is loaded (detokenization stays with the server)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class EngineDeadError(RuntimeError):
    """The engine can no longer serve: its process ended, or a step failed. Raised by a request's
    stream and by the commands still waiting for it."""

    @classmethod
    def of(cls, error: BaseException) -> EngineDeadError:
        """A new EngineDeadError for the engine's failure `error`: "<type>: <message>" of the exception a
        step raised (its __cause__), the message of one that is already an EngineDeadError."""
        if isinstance(error, EngineDeadError):
            return cls(str(error))
        dead = cls(f"{type(error).__name__}: {error}")
        dead.__cause__ = error
        return dead

    def describe(self) -> str:
        """The one sentence every front end (HTTP, console, MQTT, logs) says the failure with."""
        return f"the engine failed: {self}"


@dataclass(frozen=True)
class ServedModel:
    model: str  # the engine's --model (a synthetic:<name> or a directory)
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    policy: str  # the live config at start (later changes arrive as config_change events)
    config_version: int

    @classmethod
    def of(cls, llm: Any) -> ServedModel:
        """The ServedModel of an LLMEngine (or a simulated one)."""
        return cls(llm.config.model, llm.loaded.tokenizer, llm.loaded.config.vocab_size, llm.max_model_len,
                   llm.live.policy, llm.live.version)
