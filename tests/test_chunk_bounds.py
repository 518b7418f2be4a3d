"""``cache.chunk_bounds`` (vectorized, issue 7) against a column-by-column reference.

The reference restates the rule of the consistent mode independently: column
c runs with the scaling of length l = (largest position in columns 0..c over
all rows) + 1; lengths up to the original context share one scaling, past it
a scaling per multiple of ``step`` (rounded up); a run ends where any
rotary's scaling changes.
"""

from __future__ import annotations

import math

import pytest
import torch

from rope_ntk import cache as kv
from rope_ntk import methods
from rope_ntk.rotary import ScaledRotaryEmbedding


def rotary(original: int, step: int, method: str = "dynamic-ntk") -> ScaledRotaryEmbedding:
    rope = methods.ModelRope(10000.0, 16, original, original)
    return ScaledRotaryEmbedding(method, {"factor": 2.0, "step": step}, rope, cache_consistent=True)


def reference(originals_steps: list[tuple[int, int]], position_ids: torch.Tensor) -> list[tuple[int, int]]:
    rows = position_ids.tolist()
    bounds, previous = [], None
    for column in range(len(rows[0])):
        length = max(max(row[: column + 1]) for row in rows) + 1
        key = tuple(0 if length <= L else math.ceil(length / step) * step for L, step in originals_steps)
        if key == previous:
            bounds[-1] = (bounds[-1][0], column + 1)
        else:
            bounds.append((column, column + 1))
        previous = key
    return bounds


CASES = {
    "inside the original context": torch.arange(64)[None],
    "crossing it": torch.arange(150)[None],
    "a decoding call past it": torch.arange(200, 230)[None],
    "left-padded batch": torch.stack([torch.arange(150), torch.cat([torch.zeros(7, dtype=torch.long), torch.arange(143)])]),
    "positions that fall back": torch.cat([torch.arange(100), torch.arange(50, 90)])[None],
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setup", [[(64, 1)], [(64, 16)], [(64, 16), (32, 7)]], ids=["step1", "step16", "two"])
def test_chunk_bounds_match_the_column_by_column_rule(case, setup):
    rotaries = [rotary(L, step) for L, step in setup]
    position_ids = CASES[case]
    assert kv.chunk_bounds(rotaries, position_ids) == reference(setup, position_ids)


def test_a_method_without_step_switches_once():
    # LongRoPE: short factors up to L, long factors past it, whatever the length
    rope = methods.ModelRope(10000.0, 16, 64, 64)
    pairs = 8
    longrope = ScaledRotaryEmbedding(
        "longrope", {"short_factor": [1.0] * pairs, "long_factor": [2.0] * pairs, "factor": 2.0}, rope,
        cache_consistent=True,
    )
    assert kv.chunk_bounds([longrope], torch.arange(150)[None]) == [(0, 64), (64, 150)]
