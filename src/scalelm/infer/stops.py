"""Stop strings over a stream of decoded text: matched across token boundaries, never part of the output.

A token may end in the middle of a stop string ("\\n\\n" over two newline tokens, "END" over "E" + "ND"), so the
text is checked as a whole after every token, and while streaming, the tail that could still begin a stop string
is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """The generated text of one sequence, as it grows: `feed(text)` takes the whole decoded text so far and
    returns the part that is now safe to show; `stopped` tells whether a stop string appeared."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.shown = 0  # characters already released
        self.stopped = False
        self.text = ""  # the final text, stop string excluded

    def feed(self, text: str, final: bool = False) -> str:
        """The new safe text, given the whole decoded text so far (`final`: no more tokens will come)."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, text, final = True, text[:cut], True
        self.text = text
        safe = len(text) if final else len(text) - self._held(text)
        if not final and text.endswith("\ufffd"):  # a multi-byte character split over tokens: wait for the rest
            safe = min(safe, len(text) - 1)
        out = text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held
