"""Streaming text out of generated token ids: incremental decoding and stop strings."""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    The concatenated deltas (plus `flush()`) equal `tokenizer.decode(all ids, skip_special_tokens=...)`.
    Each step decodes only a small window: the tokens of the last emitted chunk (as context, so
    tokenizers that decode a token differently at the start of a text stay consistent) and the
    tokens not yet emitted. A window whose text ends in U+FFFD is an incomplete UTF-8 sequence
    split over tokens; that last character is held back until later tokens complete it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: first token of the last fully emitted chunk
        self._read_offset = 0  # first token not yet fully emitted
        self._sent = 0  # characters of the window's text already emitted

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far."""
        return self._ids

    def push(self, token_ids: list[int]) -> str:
        """Add new ids; return the text that became final."""
        self._ids.extend(token_ids)
        text = self._decode(self._prefix_offset, len(self._ids))
        incomplete = text.endswith(REPLACEMENT_CHAR)
        end = len(text) - 1 if incomplete else len(text)
        delta = text[self._sent : end]
        self._sent = max(self._sent, end)
        if not incomplete:
            self._advance()
        return delta

    def flush(self) -> str:
        """At the end of the stream: return whatever is still held back."""
        text = self._decode(self._prefix_offset, len(self._ids))
        delta = text[self._sent :]
        self._sent = len(text)
        self._advance()
        return delta

    def _advance(self) -> None:
        """Everything decoded so far is emitted: the pending tokens become the next window's context."""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._sent = len(self._decode(self._prefix_offset, self._read_offset))

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Streams text while watching for stop strings.

    Text that could be the beginning of a stop string is held back until it is either ruled out
    or completes the stop string. When several stop strings match, the one that completes first
    in the stream wins (then the one starting first), so the result does not depend on how the
    text was split into pushes.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string completed)."""
        if self.stopped:
            return "", True
        if not self._stop:
            return text, False
        buffer = self._held + text
        hit = self._first_match(buffer)
        if hit is not None:
            self.stopped = True
            self._held = ""
            return buffer[:hit], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of the stream (no stop hit): return the held-back tail."""
        tail, self._held = self._held, ""
        return "" if self.stopped else tail

    def _first_match(self, buffer: str) -> int | None:
        """Start of the stop string that ends first in `buffer`, or None."""
        best: tuple[int, int] | None = None
        for stop in self._stop:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
