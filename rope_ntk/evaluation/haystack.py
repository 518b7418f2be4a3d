"""Haystacks: filler text cut into units, with strings inserted at relative depths.

Two kinds of unit:

* ``essay``: sentences of a corpus (the bundled Paul Graham essays by
  default), in order, the corpus repeated if it is too short. A sentence
  ends at ``.``, ``!`` or ``?`` (and any closing quotes) followed by white
  space; the unit keeps that white space, so the units join back into the
  original text exactly.
* ``noise``: one line repeated ("The grass is green..."), as in the passkey
  test: no content the model could confuse with a needle.

Inserted strings (needles) go between units, never inside one. A depth
``f`` in [0, 1] picks the boundary whose token offset is nearest to
``f`` times the haystack's tokens (counted per unit, so within one unit of
the exact token depth).
"""

from __future__ import annotations

import bisect
import logging
import re
from itertools import accumulate

from ..errors import CorpusError, InvalidParameterError

NOISE = "The grass is green and the sky is blue. The sun is bright and yellow. Round and round it goes. "
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+")
KINDS = ("essay", "noise")
logger = logging.getLogger(__name__)


def sentences(text: str) -> list[str]:
    """``text`` cut after each sentence end; ``"".join`` gives ``text`` back."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class Haystack:
    """Units of filler and their token counts, enough for ``max_tokens``."""

    def __init__(self, tokenizer, kind: str = "essay", corpus: list[str] | None = None, max_tokens: int = 4096):
        if kind not in KINDS:
            raise InvalidParameterError(f"haystack={kind!r} is not known; valid: {', '.join(KINDS)}.")
        self.kind = kind
        if kind == "noise":
            count = len(tokenizer(NOISE * 8, add_special_tokens=False).input_ids) / 8
            self.units = [NOISE] * (int(max_tokens / count) + 2)
            self.cum = [round(i * count) for i in range(len(self.units) + 1)]
            return
        text = "".join(corpus or [])
        if not text.strip():
            raise CorpusError("the haystack corpus is empty; give a corpus with text.")
        # about 4 characters per token in English; take generously, then count
        chars = 6 * max_tokens + 2000
        text = text * (chars // len(text) + 1)
        units = sentences(text[:chars])
        counts = [len(ids) for ids in tokenizer(units, add_special_tokens=False).input_ids]
        self.units = units
        self.cum = [0, *accumulate(counts)]

    def capacity(self) -> int:
        return len(self.units)

    def check_filled(self, n: int, prompt_tokens: int, length: int) -> None:
        """Warn when every prepared unit went in and the prompt is still short of ``length``."""
        if n == len(self.units) and prompt_tokens < length - (self.cum[n] - self.cum[n - 1] if n else 0):
            logger.warning("haystack ran out at %d units: prompt has %d tokens for length %d", n, prompt_tokens,
                           length)

    def boundary(self, n: int, depth: float) -> int:
        """Index k in [0, n] of the unit boundary nearest ``depth`` of n units' tokens."""
        target = depth * self.cum[n]
        k = bisect.bisect_left(self.cum, target, 0, n + 1)
        if k > 0 and (k > n or target - self.cum[k - 1] <= self.cum[k] - target):
            k -= 1
        return k

    def text(self, n: int, inserts: list[tuple[float, str]] = ()) -> str:
        """The first ``n`` units with each (depth, string) inserted between units."""
        if n > len(self.units):
            raise InvalidParameterError(f"haystack of {n} units asked; only {len(self.units)} were prepared.")
        at: dict[int, list[str]] = {}
        for depth, string in sorted(inserts, key=lambda x: x[0]):
            at.setdefault(self.boundary(n, depth), []).append(string)
        parts = []
        for k in range(n + 1):
            for string in at.get(k, []):
                if parts and not parts[-1][-1:].isspace():
                    parts.append(" ")
                parts.append(string + (" " if k < n else ""))
            if k < n:
                parts.append(self.units[k])
        return "".join(parts)
