"""Chat messages to prompt ids: the tokenizer's chat template when the model directory has one,
else batchdeck's plain template (documented in the README):

    <|system|>
    You are terse.
    <|user|>
    Hello!
    <|assistant|>

one `<|role|>` line then the content per message, ending with `<|assistant|>` and a newline where
the reply starts.
"""
from __future__ import annotations

from typing import Any, Sequence

from batchdeck.engine.service.http.errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(content: Any, index: int) -> str:
    """A message's content as text (a string, or OpenAI's list of {"type": "text", "text": ...} parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{index}].content[{j}]: only text parts are supported "
                              f"(type 'text' with a string 'text')", f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def plain_template(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def chat_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Checked {role, content} dicts (400 naming the message for an unknown role, a non-text part, or a
    missing content: as in OpenAI's API, only an assistant message may leave it out)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise bad_request(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        if m.content is None and m.role != "assistant":
            raise bad_request(f"messages[{i}].content is required for a {m.role!r} message (only an assistant "
                              "message may leave it out)", f"messages[{i}].content")
        out.append({"role": m.role, "content": message_text(m.content, i)})
    return out


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(list(messages))
        except Exception as exc:  # a template that rejects these messages (roles out of order, ...)
            raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
    return tokenizer.encode(plain_template(messages))
