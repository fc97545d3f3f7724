"""Incremental detokenization on the real Qwen vocabulary, and stop-string streaming."""

from __future__ import annotations

import random

import pytest

from language_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pipeline.model.tiny_processors import FIRST_SPECIAL_ID, IMG_CONTEXT_ID, IMG_END_ID, IMG_START_ID, build_tokenizer

IM_START, IM_END, END_OF_TEXT = 151644, 151645, 151643

TEXTS = [
    "🙂👍🏽",
    "你好，世界",
    "𝄞𓀀🦩 ꙮ𒀀",
    "🧑‍🤝‍🧑 family 👨‍👩‍👧‍👦!",
    "I ❤️ 東京 and Zürich — ça va? 🇯🇵🇩🇪",
    "Привет, мир! مرحبا بالعالم. नमस्ते दुनिया। 안녕하세요 세계",
    "line one\n\n  indented line\twith tab\r\n   trailing spaces   \n",
    "def f(x):\n    return x ** 2  # 平方\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _chunks(ids: list[int], rng: random.Random, largest: int) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        size = rng.randint(1, largest)
        out.append(ids[i : i + size])
        i += size
    return out


def _stream(tok, chunks: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(chunk) for chunk in chunks]
    return deltas + [detok.flush()]


def test_texts_have_tokens_that_split_characters(tok):
    """The corpus really exercises partial UTF-8 sequences (single tokens decoding to U+FFFD)."""
    ids = [i for text in TEXTS for i in tok.encode(text)]
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 10


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, [[i] for i in ids])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing left over for flush on complete text


@pytest.mark.parametrize("largest", [2, 3, 7])
def test_chunked_pushes(tok, largest):
    rng = random.Random(largest)
    for text in TEXTS:
        ids = tok.encode(text)
        deltas = _stream(tok, _chunks(ids, rng, largest))
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_text_is_emitted_as_soon_as_characters_complete(tok):
    ids = tok.encode("ab 𝄞 cd")
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for n, i in enumerate(ids, start=1):
        emitted += detok.push([i])
        full = tok.decode(ids[:n])
        assert emitted == full.rstrip("\ufffd")


def test_special_tokens_are_skipped_or_kept(tok):
    ids = (
        [IM_START] + tok.encode("user\n") + [IMG_START_ID, IMG_CONTEXT_ID, IMG_CONTEXT_ID, IMG_END_ID]
        + tok.encode("\n描述这张图片 🖼️") + [IM_END, IM_START] + tok.encode("assistant\n好的") + [IM_END, END_OF_TEXT]
    )  # fmt: skip
    skipped = _stream(tok, [[i] for i in ids])
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True) == "user\n\n描述这张图片 🖼️assistant\n好的"
    kept = _stream(tok, [[i] for i in ids], skip_special_tokens=False)
    assert "".join(kept) == tok.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>" in "".join(kept)


def test_random_token_sequences(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(FIRST_SPECIAL_ID) for _ in range(rng.randint(1, 30))]
        full = tok.decode(ids, skip_special_tokens=True)
        for chunks in ([[i] for i in ids], _chunks(ids, rng, 5)):
            deltas = _stream(tok, chunks)
            assert "".join(deltas) == full, ids
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas)


def test_random_unicode_text(tok):
    """Random characters from many scripts (often split into byte tokens) never yield U+FFFD."""
    rng = random.Random(1)
    ranges = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x0400, 0x04FF), (0x1F300, 0x1FAFF), (0x10000, 0x1342F), (0xAC00, 0xD7A3)]
    for _ in range(100):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text)
        deltas = _stream(tok, _chunks(ids, rng, 3))
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


def test_each_step_decodes_a_small_window(tok):
    """Decoding stays O(new tokens): no step re-decodes the whole output."""
    calls: list[int] = []

    class Spy:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = tok.encode(" ".join(TEXTS) * 5)
    assert len(ids) > 400
    deltas = _stream(Spy(), [[i] for i in ids])
    assert "".join(deltas) == tok.decode(ids)
    assert max(calls) <= 8


def test_flush_releases_a_dangling_partial_character(tok):
    ids = tok.encode("ok 𝄞")[:-1]  # cut inside the last character
    detok = IncrementalDetokenizer(tok)
    emitted = "".join(detok.push([i]) for i in ids)
    assert "\ufffd" not in emitted
    assert emitted + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")


# --- StopStringMatcher -------------------------------------------------------------------------


def _feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def _reference(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """Cut before the stop string that completes first (ties: the one starting first)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def test_stop_string_split_across_pushes():
    matcher = StopStringMatcher(("</answer>",))
    assert matcher.push("The answer is 4</ans") == ("The answer is 4", False)
    assert matcher.push("wer> and then more") == ("", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_held_tail_is_released_when_it_stops_matching():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("OP") == ("", True)
    matcher = StopStringMatcher(("STOP",))
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("ART now S") == ("START now ", False)
    assert matcher.flush() == "S"


def test_earliest_stop_wins():
    assert _feed(("world", "lo w"), ["hello world"]) == ("hel", True)
    assert _feed(("world", "o"), ["hello world"]) == ("hell", True)
    # "c" completes before "abcd" does, however the text is split.
    for pieces in (["abcd"], list("abcd"), ["ab", "cd"]):
        assert _feed(("abcd", "c"), pieces) == ("ab", True)


def test_stop_at_the_very_beginning():
    assert _feed(("<|stop|>",), ["<|stop|>rest"]) == ("", True)
    assert _feed(("<|stop|>",), ["<|st", "op|>", "rest"]) == ("", True)


def test_no_stop_returns_everything():
    text = "a stop-less text with S, ST and STO but never the full word; 你好🙂"
    rng = random.Random(3)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _feed(("STOP", "never the fulx"), pieces) == (text, False)
    assert _feed((), ["anything ", "goes"]) == ("anything goes", False)


def test_stop_matching_does_not_depend_on_the_split():
    rng = random.Random(4)
    stops_choices = [("ab",), ("aab", "ba"), ("bbb", "abab", "a"), ("abba", "baab")]
    for _ in range(300):
        stops = rng.choice(stops_choices)
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        cuts = sorted(set(rng.randint(0, len(text)) for _ in range(rng.randint(0, 5))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _feed(stops, pieces) == _reference(stops, text), (stops, pieces)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(("ok", ""))
