"""Property tests (hypothesis) over the method registry and its formulas.

For every method, parameters are drawn from the ranges its own validation
accepts (``Param.minimum`` / ``Param.above`` / kind, read from the registry,
so a new method is covered by adding it there), together with model numbers
(base, rotated width, original length) and, for dynamic methods, the length:

* frequencies are positive and finite;
* they do not increase with the pair index (LongRoPE: when its per-pair
  factors do not decrease, which its arbitrary lists need not do);
* with factor >= 1 no scaled wavelength is shorter than the original one;
* factor 1 gives the default frequencies and attention factor 1, for every
  method where that holds; where it does not, the test says what happens.

Runs are bounded: at most 100 examples per test, no deadline.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the 'test' extra (hypothesis)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rope_ntk import InvalidParameterError, formulas, methods  # noqa: E402

# the test run draws the same examples every time (a red CI is then reproducible);
# ROPE_NTK_HYPOTHESIS_EXPLORE=1 draws new ones (how the yarn_ramp overflow at beta ~ 0 was found)
SETTINGS = settings(
    max_examples=100, deadline=None, database=None,
    derandomize=not os.environ.get("ROPE_NTK_HYPOTHESIS_EXPLORE"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
NAMES = sorted(methods.METHODS)
SCALED = [n for n in NAMES if n != "none"]
UPPER = 64.0  # largest factor-like value drawn


@st.composite
def model_numbers(draw) -> methods.ModelRope:
    dim = 2 * draw(st.integers(2, 64))  # head widths up to 128
    original = draw(st.integers(16, 2**17))
    return methods.ModelRope(
        rope_theta=draw(st.floats(10.0, 1e7)),
        dim=dim,
        original_max_position_embeddings=original,
        max_position_embeddings=original * draw(st.integers(1, 16)),
    )


def _value(spec: methods.Param, pairs: int, at_least_one: bool, sorted_lists: bool):
    """A strategy for one parameter, inside the bounds its validation enforces."""
    low = spec.minimum if spec.minimum is not None else spec.above if spec.above is not None else 0.0
    exclusive = spec.minimum is None and spec.above is not None
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "int":
        if spec.name == "original_max_position_embeddings":
            return st.integers(16, 2**17)
        return st.integers(int(low) + (1 if exclusive else 0), 4096)
    floor = max(low, 1.0) if at_least_one else low
    number = st.floats(floor, floor + UPPER, exclude_min=exclusive and floor == low, allow_nan=False)
    if spec.kind == "floats":
        lists = st.lists(number, min_size=pairs, max_size=pairs)
        return lists.map(sorted) if sorted_lists else lists
    return number


@st.composite
def case(draw, name: str, at_least_one: bool = False, sorted_lists: bool = False):
    """(method, validated params, model numbers, length) with params drawn from the registry's ranges."""
    method = methods.get_method(name)
    rope = draw(model_numbers())
    params = {}
    for spec in method.params:
        if spec.required or draw(st.booleans()):
            params[spec.name] = draw(_value(spec, rope.dim // 2, at_least_one, sorted_lists))
    try:
        params = methods.validate_params(method, params)
        methods.check_model(method, params, rope)
    except InvalidParameterError:  # e.g. beta_fast <= beta_slow: the registry refuses the combination
        assume(False)
    original = params.get("original_max_position_embeddings") or rope.original_max_position_embeddings
    seq_len = draw(st.integers(1, 8 * original)) if method.dynamic else None
    return method, params, rope, seq_len


def _frequencies(method, params, rope, seq_len):
    freqs = methods.frequencies(method, params, rope, seq_len)
    default = formulas.default_inv_freq(rope.rope_theta, rope.dim)
    assert freqs.inv_freq.dtype == torch.float64 and freqs.inv_freq.shape == default.shape
    return freqs, default


@pytest.mark.parametrize("name", NAMES)
def test_frequencies_are_positive_and_finite(name):
    @SETTINGS
    @given(case(name))
    def check(drawn):
        freqs, _ = _frequencies(*drawn)
        assert torch.isfinite(freqs.inv_freq).all() and (freqs.inv_freq > 0).all()
        assert math.isfinite(freqs.attention_factor) and freqs.attention_factor > 0

    check()


@pytest.mark.parametrize("name", NAMES)
def test_frequencies_do_not_increase_with_the_pair_index(name):
    @SETTINGS
    @given(case(name, sorted_lists=True))
    def check(drawn):
        freqs, _ = _frequencies(*drawn)
        steps = freqs.inv_freq[1:] - freqs.inv_freq[:-1]
        assert (steps <= 0).all(), freqs.inv_freq

    check()


def test_longrope_with_decreasing_factors_is_not_monotone():
    """Why the monotone test sorts LongRoPE's lists: its frequencies are inv_freq_i / lambda_i,
    so a lambda that drops faster than the base frequency falls lets the frequency rise."""
    rope = methods.ModelRope(10000.0, 8, 64)  # default frequencies 1, 0.1, 0.01, 0.001
    params = methods.validate_params("longrope", {"short_factor": [20.0, 1.0, 1.0, 1.0], "long_factor": [1.0] * 4})
    inv_freq = methods.frequencies("longrope", params, rope).inv_freq
    assert inv_freq[1] > inv_freq[0]


@pytest.mark.parametrize("name", SCALED)
def test_no_wavelength_gets_shorter_with_factor_at_least_one(name):
    """wavelength 2 pi / inv_freq: scaling by a factor >= 1 may only slow pairs down."""

    @SETTINGS
    @given(case(name, at_least_one=True))
    def check(drawn):
        freqs, default = _frequencies(*drawn)
        assert (freqs.inv_freq <= default * (1 + 1e-12)).all(), (freqs.inv_freq / default)

    check()


# factor 1 (alpha 1 for ntk; every per-pair factor 1 for longrope) and what it gives;
# dynamic-ntk is the exception: see test_dynamic_ntk_factor_one_is_not_the_identity_past_the_original
IDENTITY = {
    "linear": {"factor": 1.0},
    "ntk": {"alpha": 1.0},
    "ntk-by-parts": {"factor": 1.0},
    "yarn": {"factor": 1.0},
    "dynamic-yarn": {"factor": 1.0},
    "llama3": {"factor": 1.0},
}


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_factor_one_is_the_identity(name):
    """Exact for linear, ntk and dynamic-yarn; within float64 rounding (a blend
    w * f + (1 - w) * f / 1) for ntk-by-parts, yarn and llama3."""

    @SETTINGS
    @given(model_numbers(), st.integers(1, 2**18))
    def check(rope, seq_len):
        params = methods.validate_params(name, dict(IDENTITY[name]))
        freqs, default = _frequencies(methods.get_method(name), params, rope, seq_len)
        if name in ("linear", "ntk", "dynamic-yarn"):
            assert torch.equal(freqs.inv_freq, default)
        else:
            assert torch.allclose(freqs.inv_freq, default, rtol=1e-14, atol=0)
        assert freqs.attention_factor == 1.0

    check()


def test_longrope_factor_one_with_unit_lists_is_the_identity():
    """LongRoPE's ``factor`` sets only the attention factor; the frequencies come from the
    per-pair lists, so factor 1 is the identity only together with lists of ones."""

    @SETTINGS
    @given(model_numbers(), st.integers(1, 2**18))
    def check(rope, seq_len):
        ones = [1.0] * (rope.dim // 2)
        params = methods.validate_params("longrope", {"short_factor": ones, "long_factor": ones, "factor": 1.0})
        freqs, default = _frequencies(methods.get_method("longrope"), params, rope, seq_len)
        assert torch.equal(freqs.inv_freq, default) and freqs.attention_factor == 1.0

    check()


def test_dynamic_ntk_factor_one_is_not_the_identity_past_the_original():
    """dynamic-ntk's alpha = factor * l / L - (factor - 1) is l / L at factor 1 (as in
    transformers' ``dynamic``): the identity up to L, NTK with alpha = l / L past it."""

    @SETTINGS
    @given(model_numbers(), st.integers(1, 2**18))
    def check(rope, seq_len):
        params = methods.validate_params("dynamic-ntk", {"factor": 1.0})
        freqs, default = _frequencies(methods.get_method("dynamic-ntk"), params, rope, seq_len)
        original = rope.original_max_position_embeddings
        if seq_len <= original:
            assert torch.equal(freqs.inv_freq, default)
        else:
            alpha = seq_len / original
            base = rope.rope_theta * alpha ** (rope.dim / (rope.dim - 2))
            pairs = torch.arange(rope.dim // 2, dtype=torch.float64)
            assert torch.allclose(freqs.inv_freq, base ** (-2 * pairs / rope.dim), rtol=1e-12)

    check()
