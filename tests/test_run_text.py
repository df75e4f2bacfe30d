"""Incremental detokenization: multi-byte characters split over byte-level tokens print whole, streamed pieces add
up to the full decode, stop strings are cut and never half-streamed."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from qosora.run.text import TextStream


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE with no merges: one token per byte, so 'é' is two tokens and '€' three."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def stream(tok, text, stop=()):
    s = TextStream(tok, stop)
    pieces = [s.push(i) for i in tok.encode(text).ids] + [s.finish()]
    return s, [p for p in pieces if p]


def test_multibyte_characters_print_whole(byte_tokenizer):
    text = "café 10€ naïve"
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) > len(text)  # really split into bytes
    s, pieces = stream(byte_tokenizer, text)
    assert "".join(pieces) == byte_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop, expected", [(("\n\n",), "one\ntwo"), (("two", "ne"), "o"), (("zzz",), None),
                                            (("é!",), "one\ntwo\n\nthree caf")])
def test_stop_strings_are_cut_and_never_streamed(byte_tokenizer, stop, expected):
    text = "one\ntwo\n\nthree café!"
    s, pieces = stream(byte_tokenizer, text, stop)
    want = text if expected is None else expected
    assert s.text == want and "".join(pieces) == want and s.stopped == (expected is not None)


def test_a_held_back_prefix_is_released_when_the_stop_does_not_come(byte_tokenizer):
    s = TextStream(byte_tokenizer, ("ab!",))
    out = [s.push(i) for i in byte_tokenizer.encode("xab").ids]
    assert "".join(out) == "x"  # "ab" could still become "ab!"
    out.append(s.push(byte_tokenizer.encode("c").ids[0]))
    assert "".join(out) == "xabc" and not s.stopped


def test_lazy_mode_decodes_once(byte_tokenizer):
    s = TextStream(byte_tokenizer, incremental=False)
    assert all(s.push(i) == "" for i in byte_tokenizer.encode("héllo").ids)
    assert s.finish() == "héllo"
