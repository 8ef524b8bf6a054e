"""Text deltas: never half a UTF-8 character, never the start of a stop string, and they add up
to the final text."""

from __future__ import annotations

from engine.detok import REPLACEMENT, TextStream, render_canvas, stop_prefix_len
from engine.types import MASK_GLYPH

TEXT = "a = '€uro' # ü 😀 naïve\n"


def test_multibyte_characters_split_over_tokens_are_held_back(tok):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # a small vocabulary: characters span tokens
    stream = TextStream(tok, stop_ids={tok.eos_id}, stops=[])
    deltas = []
    for i in ids:  # one token at a time, the worst case for a block of length 1
        text, _ = stream.push([i])
        assert REPLACEMENT not in text
        deltas.append(text)
    text, _ = stream.flush(tok.decode(ids))
    deltas.append(text)
    assert "".join(deltas) == TEXT
    assert any(d == "" for d in deltas[:-1])  # something really was held back


def test_possible_stop_string_start_is_held_back(tok):
    stream = TextStream(tok, stop_ids=set(), stops=["STOP", "\n\n"])
    sent, _ = stream.push(tok.encode("x = 1 ST"))
    assert sent == "x = 1 "  # "ST" may become "STOP"
    sent, _ = stream.push(tok.encode("ILL\n"))
    assert sent == "STILL"  # it did not; "\n" may still become "\n\n"
    assert stream.sent == "x = 1 STILL"


def test_text_from_a_whole_stop_string_on_is_never_sent(tok):
    # A block commits many tokens at once: the stop string and text past it arrive in one push.
    stream = TextStream(tok, stop_ids=set(), stops=["STOP", "\n\n"])
    sent, _ = stream.push(tok.encode("x = 1"))
    more, _ = stream.push(tok.encode(" STOP y = 2 STOP z"))
    assert sent + more == "x = 1 "
    rest, _ = stream.flush("x = 1 ")  # the final text, cut at the stop as Sequence cuts it
    assert rest == "" and stream.sent == "x = 1 "


def test_stop_prefix_len():
    assert stop_prefix_len("abc", ["cd"]) == 1
    assert stop_prefix_len("abc", ["bcd", "cx"]) == 2
    assert stop_prefix_len("abc", ["abc"]) == 0  # a whole stop string is the caller's business
    assert stop_prefix_len("abc", []) == 0


def test_deltas_carry_every_token_once(tok):
    ids = tok.encode(TEXT)
    stream = TextStream(tok, stop_ids={tok.eos_id}, stops=[])
    got = []
    for i in range(0, len(ids), 3):
        got += stream.push(ids[i:i + 3])[1]
    got += stream.flush(tok.decode(ids), [tok.eos_id])[1]
    assert got == ids + [tok.eos_id]


def test_render_canvas_shows_masks(tok):
    a, b = tok.encode("def"), tok.encode(" f():")
    canvas = a + [tok.mask_id] * 2 + b + [tok.mask_id]
    assert render_canvas(tok, canvas, tok.mask_id) == f"def{MASK_GLYPH * 2} f():{MASK_GLYPH}"
