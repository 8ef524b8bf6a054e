"""Committed tokens -> text deltas that never need taking back; canvases with masks shown.

    stream = TextStream(tokenizer, stop_ids={eos}, stops=["\\n\\n"])
    text, ids = stream.push(block_tokens)     # what may be sent now ("" while held back)
    text, ids = stream.flush(final_text)      # the rest, at the end
    render_canvas(tokenizer, canvas_ids, mask_id)   # "def f(x):░░░░ return░░"

Byte-level BPE splits multi-byte UTF-8 characters over tokens, and the decoder shows an incomplete
trailing character as U+FFFD; a stop string must never be half-sent and then cut. So each push
decodes all committed tokens (the same `decode` the reference uses for the final text, so the
deltas add up to it exactly) and holds back (1) a trailing run of U+FFFD, which more bytes may
turn into a character, and (2) the longest tail that is a proper prefix of a stop string; text
from a whole stop string on is never sent.
What was sent is always a prefix of the final text: a stop string found later cannot start inside
the sent text, since its start would have been a held-back tail.
"""

from __future__ import annotations

import logging

from engine.types import MASK_GLYPH

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    def __init__(self, tokenizer, stop_ids: set[int], stops: list[str]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stops = [s for s in stops if s]
        self.text_ids: list[int] = []  # committed tokens that carry text (stop tokens dropped)
        self.sent = ""  # text already handed out
        self._unsent_ids: list[int] = []  # tokens committed since the last delta
        self.n_tokens = 0  # tokens pushed so far

    @property
    def text(self) -> str:
        """Everything committed so far, decoded (nothing held back)."""
        return self.tokenizer.decode(self.text_ids)

    def push(self, token_ids: list[int]) -> tuple[str, list[int]]:
        """Add committed tokens; -> (text that may be sent now, the tokens it came from)."""
        self._unsent_ids += token_ids
        self.n_tokens += len(token_ids)
        self.text_ids += [t for t in token_ids if t not in self.stop_ids]
        text = self.text
        cut = first_stop(text, self.stops)
        if cut is not None:
            # A whole stop string arrived in this push (a block commits many tokens at once):
            # nothing from it on is ever sent; the final text ends there too.
            text = text[:cut]
        stable = text.rstrip(REPLACEMENT)
        if cut is None:
            stable = stable[:len(stable) - stop_prefix_len(stable, self.stops)]
        if len(stable) <= len(self.sent):
            return "", []
        if not stable.startswith(self.sent):  # cannot happen for prefix-stable decoders
            log.warning("decoded text changed under the sent prefix; holding it back")
            return "", []
        delta, self.sent = stable[len(self.sent):], stable
        ids, self._unsent_ids = self._unsent_ids, []
        return delta, ids

    def flush(self, final_text: str, more_ids: list[int] = ()) -> tuple[str, list[int]]:
        """The rest of final_text (the whole completion, cut at a stop string); more_ids: the
        last committed tokens that were never pushed (the block holding a stop token)."""
        ids, self._unsent_ids = self._unsent_ids + list(more_ids), []
        self.n_tokens += len(more_ids)
        if not final_text.startswith(self.sent):
            log.error("final text does not extend the streamed text; sending nothing more")
            return "", ids
        delta, self.sent = final_text[len(self.sent):], final_text
        return delta, ids


def render_canvas(tokenizer, canvas: list[int], mask_id: int) -> str:
    """Decode runs of committed tokens; one MASK_GLYPH per still-masked position."""
    out: list[str] = []
    run: list[int] = []
    for tok in canvas:
        if tok == mask_id:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(MASK_GLYPH)
        else:
            run.append(tok)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)
