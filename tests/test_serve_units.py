"""The server's pure parts: incremental detokenization with stop strings, chat prompts, prompt parsing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchdeck.engine.service.http.chat import chat_prompt_ids, plain_template
from batchdeck.engine.service.http.detokenizer import IncrementalDetokenizer
from batchdeck.engine.service.http.errors import OpenAIError
from batchdeck.engine.service.http.serving import completion_prompts
from batchdeck.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def stream(text: str, stop=(), chunk: int = 1) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(TOK, stop)
    ids = TOK.encode(text)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(d.add(ids[i:i + chunk]))
        if d.stopped:
            return pieces, d
    pieces.append(d.flush())
    return pieces, d


def test_multibyte_characters_are_never_cut():
    pieces, d = stream("añb€c😀d")
    assert "".join(pieces) == "añb€c😀d" and d.text == "añb€c😀d"
    assert all("\ufffd" not in p for p in pieces)
    assert "😀" in pieces  # released whole, once its 4th byte came


def test_stop_string_ends_the_text_and_is_not_returned():
    pieces, d = stream("hello STOP world", stop=["STOP"])
    assert "".join(pieces) == "hello " and d.stopped == "STOP"
    assert "S" not in "".join(pieces)


def test_text_that_only_starts_like_a_stop_string_is_released():
    pieces, d = stream("a STAR is born", stop=["STOP"])
    assert "".join(pieces) == "a STAR is born" and d.stopped is None
    assert pieces[2] == ""  # "S" was held while it could still begin "STOP"


def test_the_earliest_stop_string_wins_and_multi_token_steps():
    pieces, d = stream("xx end. yy halt", stop=["halt", "end"], chunk=5)
    assert "".join(pieces) == "xx " and d.stopped == "end"


def test_min_tokens_delays_stop_strings():
    d = IncrementalDetokenizer(TOK, ["a"], min_tokens=3)
    assert d.add(TOK.encode("a")) == "a" and d.stopped is None
    d.add(TOK.encode("b"))
    assert d.add(TOK.encode("a")) == "" and d.stopped == "a"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), stop=st.lists(st.text(min_size=1, max_size=4), max_size=3),
       chunk=st.integers(1, 6))
def test_streamed_text_stops_at_a_stop_string_and_never_contains_one(text, stop, chunk):
    pieces, d = stream(text, stop, chunk)
    out = "".join(pieces)
    assert text.startswith(out) and out == d.text
    assert not any(s in out for s in stop)  # no stop string is ever returned, whole or split over chunks
    if d.stopped is None:
        assert out == text
    else:
        assert text[len(out):].startswith(d.stopped)


class WindowDecoded(ByteTokenizer):
    """The same tokenizer, not recognized as byte-level: the detokenizer's generic window path."""


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 300), st.sampled_from([0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F])),
                    max_size=40),
       stop=st.lists(st.text(min_size=1, max_size=3), max_size=2), chunk=st.integers(1, 5), min_tokens=st.integers(0, 4))
def test_the_byte_level_fast_path_releases_what_the_window_path_releases_in_total(ids, stop, chunk, min_tokens):
    fast, slow = IncrementalDetokenizer(TOK, stop, min_tokens), IncrementalDetokenizer(WindowDecoded(), stop, min_tokens)
    assert fast._bytes is not None and slow._bytes is None
    for i in range(0, len(ids), chunk):
        fast.add(ids[i:i + chunk])
        slow.add(ids[i:i + chunk])
    fast.flush()
    slow.flush()
    if not stop:  # the same text in total; with stop strings also the same verdict when no U+FFFD is involved
        assert fast.text == slow.text == TOK.decode(ids)
    elif "\ufffd" not in TOK.decode(ids):
        assert (fast.text, fast.stopped) == (slow.text, slow.stopped)


class TemplateTokenizer(ByteTokenizer):
    chat_template = "{% for m in messages %}...{% endfor %}"

    def apply_chat_template(self, messages):
        return self.encode("|".join(f"{m['role']}={m['content']}" for m in messages) + "|assistant=")


def test_chat_template_when_the_tokenizer_has_one_else_the_plain_one():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert TOK.decode(chat_prompt_ids(TemplateTokenizer(), msgs)) == "system=be brief|user=hi|assistant="
    assert TOK.decode(chat_prompt_ids(TOK, msgs)) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert plain_template([]) == "<|assistant|>\n"


def test_completion_prompt_shapes():
    assert completion_prompts("ab", TOK, 512) == [[97, 98]]
    assert completion_prompts([1, 2], TOK, 512) == [[1, 2]]
    assert completion_prompts(["a", "b"], TOK, 512) == [[97], [98]]
    assert completion_prompts([[1], [2, 3]], TOK, 512) == [[1], [2, 3]]
    for bad in (None, [], [1, "a"], [[1], "a"], [True], [[600]], 5, {"a": 1}):
        with pytest.raises(OpenAIError) as info:
            completion_prompts(bad, TOK, 512)
        assert info.value.status == 400 and info.value.param == "prompt"
