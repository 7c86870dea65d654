"""Tokenizers: a byte-level one for synthetic models (and directories without a tokenizer), and a
thin wrapper over a local Hugging Face tokenizer.

Byte-level ids: 0..255 are bytes, 256 is BOS, 257 is EOS. Ids beyond (a synthetic model with a
real vocabulary samples them) decode to a printable ASCII character, so text out always works.
"""
from __future__ import annotations

from typing import Protocol, Sequence

BYTE_BOS, BYTE_EOS = 256, 257


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Bytes in, bytes out. Its EOS (257) is the synthetic models' own; a model directory without a
    tokenizer gets `ByteTokenizer(eos_token_id=None)`: its EOS comes from the model's configs."""

    chat_template: str | None = None  # none: the server uses its plain template

    def __init__(self, eos_token_id: int | None = BYTE_EOS):
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def to_bytes(ids: Sequence[int]) -> bytes:
        """The bytes the ids stand for (what `decode` reads as UTF-8, and a streaming detokenizer feeds
        its incremental decoder): 0..255 themselves, BOS/EOS nothing, other ids a printable ASCII character."""
        if len(ids) == 1 and ids[0] < 256:  # one byte: a streamed decode step's usual case
            return bytes(ids)
        return bytes(i if i < 256 else 33 + i % 94 for i in ids if i != BYTE_BOS and i != BYTE_EOS)


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.eos_token_id = self._tok.eos_token_id
        self.chat_template: str | None = getattr(self._tok, "chat_template", None)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a chat through the model directory's own template (ends ready for the reply)."""
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
