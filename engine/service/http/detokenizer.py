"""Incremental detokenization with stop strings, for streamed responses.

Text is decoded a little at a time the way vLLM does it: each step decodes the tokens released last
time plus the new ones, and the text past the released tokens' own decoding is the new text (so a
token's leading space or merge decodes as it does in context). A window that
ends in U+FFFD is an unfinished multi-byte character (a byte-level token split it), so nothing is
released until the next token completes it: text is never cut inside a character.

Byte-level tokenizers (the synthetic models') take a faster path with the same result: their ids
are bytes (`ByteTokenizer.to_bytes`, the mapping its `decode` reads), so an incremental UTF-8 decoder
releases exactly the completed characters, one call per step instead of two window decodes.

Stop strings: text that could still be the start of a stop string is held back (at most the longest
stop string's length minus one characters); once a stop string appears, the text before it is
released, the stop string itself never is, and `stopped` is set (the caller aborts the request).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Sequence

from batchdeck.engine.tokenizer import ByteTokenizer, Tokenizer

REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    min_tokens: int = 0  # stop strings count only once this many tokens were generated (vLLM's rule)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # everything released so far
    stopped: str | None = None  # the stop string that ended the text
    _prefix_offset: int = 0
    _read_offset: int = 0
    _held: str = ""  # decoded, not yet released (could begin a stop string)

    _bytes: Any = None  # the incremental UTF-8 decoder of a byte-level tokenizer

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        if type(self.tokenizer) is ByteTokenizer:
            self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Take new tokens; return the text they release (possibly empty)."""
        if self.stopped is not None:
            return ""
        self.token_ids.extend(new_token_ids)
        if self._bytes is not None:
            new = self._bytes.decode(ByteTokenizer.to_bytes(new_token_ids))
            if not new:
                return ""
            self._held += new
            self._read_offset = len(self.token_ids)
            if not self.stop:  # nothing to hold back or cut
                self._held = ""
                self.text += new
                return new
            return self._release(final=False)
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(ids[self._prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an unfinished character (or nothing printable yet): wait for more tokens
        self._held += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request finished without a stop string: release everything held."""
        if self.stopped is not None:
            return ""
        if self._bytes is not None:
            self._held += self._bytes.decode(b"", final=True)
        elif self._read_offset < len(self.token_ids):  # a trailing partial character: decode what there is
            prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
            if len(full) > len(prefix):
                self._held += full[len(prefix):]
            self._read_offset = len(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        if self.stop and len(self.token_ids) >= self.min_tokens:
            cut = None
            for s in self.stop:
                i = held.find(s)
                if i >= 0 and (cut is None or i < cut[0]):
                    cut = (i, s)
            if cut is not None:
                self.stopped = cut[1]
                self._held = ""
                out = held[:cut[0]]
                self.text += out
                return out
        keep = 0 if final or not self.stop else min(self._hold, len(held))
        # hold back only a tail that could still grow into a stop string
        while keep and not any(s.startswith(held[len(held) - keep:]) for s in self.stop):
            keep -= 1
        out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out
