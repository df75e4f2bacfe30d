"""Incremental detokenization with stop strings: token ids in, printable text pieces out.

A token is not always a piece of text by itself (a byte of a multi-byte character, a merge that changes the
previous word's spacing), so each new id is decoded within a short window: `decode(ids[prefix:])` minus
`decode(ids[prefix:read])`, emitted once it no longer ends in U+FFFD (an incomplete UTF-8 sequence). The window
then slides (as vLLM and transformers' TextStreamer do), so the work per token does not grow with the output.

Stop strings: the text is cut where the first one starts, and the tail that could still become a stop string is
held back, so what was streamed is always a prefix of the final text, and their concatenation equals it.
"""

from __future__ import annotations


class TextStream:
    """`incremental=False` (nobody reads the pieces and no stop strings): decode once in `finish`."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), incremental: bool = True):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.incremental = incremental or bool(self.stop)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # decoded so far (before cutting at a stop string)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._longest = max((len(s) for s in self.stop), default=0)

    def push(self, token: int) -> str:
        """Add one generated id; return the text that became final (maybe ""). Sets `stopped` at a stop string."""
        if self.stopped:  # the text ended at a stop string: later ids change nothing
            return ""
        self.ids.append(token)
        if not self.incremental:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = len(self.text)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            if self.stop:
                return self._check_stop(start)
            return self._emit(len(self.text))
        return ""

    def finish(self) -> str:
        """End of generation: flush what was held back (an incomplete character included)."""
        piece = ""
        if not self.stopped and self.read < len(self.ids):
            start, before = len(self.text), self.tokenizer.decode(self.ids[self.prefix:self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
            piece = self._check_stop(start) if self.stop else ""
        return piece + self._emit(len(self.text))

    def _check_stop(self, start: int) -> str:
        """Cut `text` at the first stop string that ends in the new text; emit what can no longer start one."""
        lo = max(0, start - self._longest + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, lo)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._emit(len(self.text))
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - held)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece
