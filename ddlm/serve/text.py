"""A choice's text: the final one from its tokens, and the streamed one while its canvas fills in.

    text, reason, count = final_text(tok, tokens, start, end, stop)      # tokens int [L]
    stream = TextStream(tok, x_init, start, end, stop, final_once_unmasked)
    stream.update(positions, tokens)        # a network call's input (engine.Engine's canvases)
    delta = stream.delta()                  # new text that can no longer change ('' if none)
    delta = stream.close(final_tokens)      # the rest, once the row is decoded

The generated span is [start, end): the text is its tokens up to the first eos (finish_reason 'stop'), cut
before the first stop string ('stop'), else all of them ('length'). While decoding, the committed text is
the span's prefix up to its first masked position, for samplers whose unmasked tokens never change
(final_once_unmasked): block samplers (parallel with blocks, bd3lm) commit it block by block, AR token by
token. The last max(len(stop)) - 1 characters (a stop string may be starting) and a trailing undecodable
byte are held back until they are certain, so every delta is a piece of the final text.
"""

from __future__ import annotations

import numpy as np

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def final_text(tok, tokens, start: int, end: int, stop: list[str]) -> tuple[str, str, int]:
    """(text, finish_reason 'stop' | 'length', completion tokens) of the span [start, end) of tokens [L]."""
    span = [int(t) for t in np.asarray(tokens)[start:end]]
    reason = "length"
    if tok.eos_id in span:
        span = span[: span.index(tok.eos_id)]
        reason = "stop"
    text, cut = _cut(tok.decode(span), stop)
    return text, "stop" if cut else reason, len(span)


class TextStream:
    """The streamed text of one choice (module doc)."""

    def __init__(self, tok, x_init, start: int, end: int, stop: list[str], final_once_unmasked: bool):
        self.tok = tok
        self.canvas = np.array(x_init, np.int32)
        self.start, self.end = start, end
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.streams_early = final_once_unmasked
        self.emitted = ""
        self.calls = 0  # network calls seen (the page's step counter)
        self.finished = False  # a stop string or eos is already in the committed text

    def update(self, positions, tokens) -> None:
        self.canvas[np.asarray(positions)] = np.asarray(tokens)
        self.calls += 1

    def span(self) -> np.ndarray:
        return self.canvas[self.start : self.end]

    def masked(self) -> int:
        return int(np.sum(self.span() == self.tok.mask_id))

    def delta(self) -> str:
        """Text committed since the last delta ('' when nothing new is certain)."""
        if not self.streams_early or self.finished:
            return ""
        span = self.span()
        masked = np.flatnonzero(span == self.tok.mask_id)
        committed = [int(t) for t in span[: masked[0] if masked.size else len(span)]]
        if self.tok.eos_id in committed:
            committed = committed[: committed.index(self.tok.eos_id)]
            self.finished = True
        text, cut = _cut(self.tok.decode(committed), self.stop)
        if cut:
            self.finished = True
        elif not self.finished:  # more may follow: keep back a possible stop string's start
            text = text[: max(0, len(text) - self.hold)]
            text = text.rstrip(REPLACEMENT)
        return self._advance(text)

    def close(self, tokens) -> str:
        """The rest of the final text of tokens [L] (which become the canvas)."""
        self.canvas = np.array(tokens, np.int32)
        text, _, _ = final_text(self.tok, tokens, self.start, self.end, self.stop)
        self.finished = True
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        out, self.emitted = text[len(self.emitted) :], text
        return out
