"""rope_ntk.formulas against closed forms in float64 numpy (tests/reference.py).

Nothing here calls a rope_ntk helper to build an expected value: the
references (tests/reference.py) are the papers' formulas, typed in again.

* default RoPE (RoFormer, arXiv:2104.09864): theta_i = base^(-2i/d)
* linear / position interpolation (arXiv:2306.15595): theta_i / s
* NTK-aware (YaRN paper eq. 16): base' = base * alpha^(d/(d-2))
* dynamic NTK (emozilla; transformers' "dynamic"):
  alpha(l) = s * l / L - (s - 1) for l > L, default RoPE for l <= L
* YaRN (arXiv:2309.00071 eqs. 18-22): NTK-by-parts ramp between the pair
  that turns beta_fast = 32 times in L and the one that turns beta_slow = 1
  time (bounds floored / ceiled), attention factor 0.1 ln(s) + 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import ref_default, ref_dynamic_alpha, ref_ntk_base, ref_rotations, ref_yarn

from rope_ntk import formulas, methods

# (rope_theta, dim, factor, original context L)
COMBOS = [
    (10_000.0, 128, 2.0, 4096),  # Llama-2-like
    (100_000.0, 64, 2.0, 8192),  # SmolLM2-like
    (100_000.0, 64, 4.0, 8192),
    (500_000.0, 128, 8.0, 8192),  # Llama-3-like base
    (10_000.0, 32, 4.0, 2048),  # partial rotary: 32 of 128 channels rotated
    (1_000_000.0, 32, 3.0, 32768),
]
IDS = [f"theta{int(t)}-d{d}-s{s:g}-L{L}" for t, d, s, L in COMBOS]
TIGHT = dict(rtol=1e-12, atol=0.0)


def as_np(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float64, f"formulas must return float64, got {t.dtype}"
    return t.numpy()


def close(actual, expected, **tol):
    np.testing.assert_allclose(actual, expected, **(tol or TIGHT))


# ---------------------------------------------------------------- default / linear


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_default_matches_roformer(theta, dim, factor, L):
    got = formulas.default(theta, dim)
    assert got.inv_freq.shape == (dim // 2,)
    close(as_np(got.inv_freq), ref_default(theta, dim))
    assert got.attention_factor == 1.0
    # the highest frequency is exactly 1 rad / position, the lowest base^(-(d-2)/d)
    assert got.inv_freq[0].item() == 1.0
    assert math.isclose(got.inv_freq[-1].item(), theta ** (-(dim - 2) / dim), rel_tol=1e-12)


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_linear_divides_every_frequency_by_factor(theta, dim, factor, L):
    got = formulas.linear(theta, dim, factor)
    close(as_np(got.inv_freq), ref_default(theta, dim) / factor)
    assert got.attention_factor == 1.0
    # position interpolation: position p under linear == position p / factor unscaled
    p = np.arange(0, factor * L, 997.0)
    close(np.outer(p, as_np(got.inv_freq)), np.outer(p / factor, ref_default(theta, dim)))


# ---------------------------------------------------------------- NTK


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_ntk_base_and_frequencies(theta, dim, factor, L):
    alpha = factor
    assert math.isclose(formulas.ntk_base(theta, dim, alpha), ref_ntk_base(theta, dim, alpha), rel_tol=1e-13)
    got = as_np(formulas.ntk(theta, dim, alpha).inv_freq)
    close(got, ref_default(ref_ntk_base(theta, dim, alpha), dim))
    default = ref_default(theta, dim)
    # lowest frequency exactly alpha times slower, highest unchanged
    assert math.isclose(default[-1] / got[-1], alpha, rel_tol=1e-12)
    assert got[0] == default[0] == 1.0
    # in between, pair i slows by alpha^(2i/(d-2)): strictly between 1 and alpha
    i = np.arange(dim // 2)
    close(default / got, alpha ** (2 * i / (dim - 2)))
    assert np.all((default / got)[1:-1] > 1.0) and np.all((default / got)[1:-1] < alpha)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 7.25])
def test_ntk_through_registry_accepts_alpha_or_factor(alpha):
    rope = methods.ModelRope(rope_theta=100_000.0, dim=64, original_max_position_embeddings=8192)
    expected = ref_default(ref_ntk_base(100_000.0, 64, alpha), 64)
    for params in ({"alpha": alpha}, {"factor": alpha}, {"alpha": alpha, "factor": alpha}):
        resolved = methods.validate_params("ntk", params)
        assert resolved == {"alpha": alpha}
        close(as_np(methods.frequencies("ntk", resolved, rope).inv_freq), expected)


# ---------------------------------------------------------------- dynamic NTK


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_dynamic_ntk_alpha_formula(theta, dim, factor, L):
    for l in (L, L + 1, 3 * L // 2, 2 * L, int(factor * L), 5 * L):
        got = formulas.dynamic_ntk_alpha(factor, l, L)
        assert math.isclose(got, ref_dynamic_alpha(factor, l, L), rel_tol=1e-14)
    assert formulas.dynamic_ntk_alpha(factor, L, L) == 1.0


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_dynamic_ntk_is_default_up_to_original_length(theta, dim, factor, L):
    default = formulas.default(theta, dim).inv_freq
    for l in (1, 2, L // 2, L - 1, L):
        got = formulas.dynamic_ntk(theta, dim, factor, L, l)
        assert torch.equal(got.inv_freq, default), f"seq_len={l}"
        assert got.attention_factor == 1.0
    close(as_np(default), ref_default(theta, dim))


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_dynamic_ntk_beyond_original_length_is_ntk_with_alpha_of_l(theta, dim, factor, L):
    for l in (L + 1, 3 * L // 2, int(factor * L), 4 * L):
        alpha = ref_dynamic_alpha(factor, l, L)
        assert alpha > 1.0
        got = formulas.dynamic_ntk(theta, dim, factor, L, l)
        close(as_np(got.inv_freq), ref_default(ref_ntk_base(theta, dim, alpha), dim))
        assert got.attention_factor == 1.0
    # at l = factor * L the scale is factor * factor - (factor - 1), NOT factor
    # (the transformers / emozilla formula); alpha reaches factor at (2 - 1/factor) * L
    at_fL = as_np(formulas.dynamic_ntk(theta, dim, factor, L, int(factor * L)).inv_freq)
    close(at_fL, ref_default(ref_ntk_base(theta, dim, factor * factor - factor + 1), dim))
    l_alpha_eq_factor = (2 - 1 / factor) * L
    if l_alpha_eq_factor.is_integer():
        got = as_np(formulas.dynamic_ntk(theta, dim, factor, L, int(l_alpha_eq_factor)).inv_freq)
        close(got, ref_default(ref_ntk_base(theta, dim, factor), dim))


def test_dynamic_ntk_slows_monotonically_with_length():
    theta, dim, factor, L = 100_000.0, 64, 2.0, 8192
    lowest = [formulas.dynamic_ntk(theta, dim, factor, L, l).inv_freq[-1].item() for l in range(L, 4 * L, 1024)]
    assert all(a > b for a, b in zip(lowest, lowest[1:]))


# ---------------------------------------------------------------- YaRN


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_yarn_matches_paper(theta, dim, factor, L):
    got = formulas.yarn(theta, dim, factor, L)
    want, mscale = ref_yarn(theta, dim, factor, L)
    close(as_np(got.inv_freq), want)
    assert math.isclose(got.attention_factor, 0.1 * math.log(factor) + 1.0, rel_tol=1e-14)
    assert math.isclose(got.attention_factor, mscale, rel_tol=1e-14)


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_yarn_keeps_fast_pairs_and_interpolates_slow_pairs(theta, dim, factor, L):
    """Pairs turning > 32 times in L are untouched, pairs turning < 1 time are divided by factor."""
    got = as_np(formulas.yarn(theta, dim, factor, L).inv_freq)
    default = ref_default(theta, dim)
    turns = ref_rotations(theta, dim, L)
    fast, slow = turns > 32, turns < 1
    middle = ~fast & ~slow
    assert fast.any() and slow.any(), "combo must have both kinds of pairs to test anything"
    close(got[fast], default[fast], rtol=1e-15)
    close(got[slow], default[slow] / factor, rtol=1e-15)
    # "untouched" means bit for bit the module's own unscaled frequency
    own_default = as_np(formulas.default(theta, dim).inv_freq)
    np.testing.assert_array_equal(got[fast], own_default[fast])
    # in between: interpolated, never outside [default / factor, default]
    assert np.all(got[middle] <= default[middle]) and np.all(got[middle] >= default[middle] / factor * (1 - 1e-15))
    # and the scale per pair (default / got) never decreases toward low frequencies
    ratio = default / got
    assert np.all(np.diff(ratio) >= -1e-12)


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_yarn_ramp_bounds_are_floored_and_ceiled(theta, dim, factor, L):
    ramp = as_np(formulas.yarn_ramp(dim, theta, L))
    low = math.floor(dim * math.log(L / (2 * math.pi * 32)) / (2 * math.log(theta)))
    high = math.ceil(dim * math.log(L / (2 * math.pi * 1)) / (2 * math.log(theta)))
    low, high = max(low, 0), min(high, dim - 1)
    i = np.arange(dim // 2)
    np.testing.assert_array_equal(ramp[i <= low], 0.0)
    np.testing.assert_array_equal(ramp[i >= high], 1.0)
    inner = (i > low) & (i < high)
    close(ramp[inner], (i[inner] - low) / (high - low))


def test_yarn_when_even_the_slowest_pair_turns_more_than_once():
    """L = 131072 with base 10000: every pair turns > 1 time in L, so the ramp's
    upper bound lies past the last pair and no pair gets the full factor."""
    theta, dim, factor, L = 10_000.0, 128, 4.0, 131_072
    turns = ref_rotations(theta, dim, L)
    assert turns.min() > 1
    got = as_np(formulas.yarn(theta, dim, factor, L).inv_freq)
    close(got, ref_yarn(theta, dim, factor, L)[0])
    ratio = ref_default(theta, dim) / got
    assert ratio.max() < factor * (1 - 1e-3)
    close(ratio[turns > 32], 1.0, rtol=1e-15)


def test_yarn_tiny_original_context_has_no_zero_division():
    """L = 4 < 2 pi: both ramp bounds clamp to pair 0 (the one-pair ramp guard)."""
    got = formulas.yarn(10_000.0, 16, 2.0, 4)
    assert torch.isfinite(got.inv_freq).all()
    close(as_np(got.inv_freq), ref_yarn(10_000.0, 16, 2.0, 4)[0])
    close(as_np(got.inv_freq)[1:], ref_default(10_000.0, 16)[1:] / 2.0)


def test_yarn_options_beta_truncate_attention_factor():
    theta, dim, factor, L = 100_000.0, 64, 4.0, 8192
    for beta_fast, beta_slow, truncate in [(16.0, 2.0, True), (32.0, 1.0, False), (64.0, 0.5, False)]:
        got = formulas.yarn(theta, dim, factor, L, beta_fast, beta_slow, None, truncate)
        want, _ = ref_yarn(theta, dim, factor, L, beta_fast, beta_slow, truncate)
        close(as_np(got.inv_freq), want)
    # without truncation the ramp differs from the truncated one
    assert not torch.equal(
        formulas.yarn(theta, dim, factor, L, truncate=False).inv_freq, formulas.yarn(theta, dim, factor, L).inv_freq
    )
    # an explicit attention factor is used as given
    assert formulas.yarn(theta, dim, factor, L, attention_factor=0.75).attention_factor == 0.75


def test_yarn_mscale():
    for s in (1.5, 2.0, 4.0, 16.0, 32.0):
        assert math.isclose(formulas.yarn_mscale(s), 0.1 * math.log(s) + 1, rel_tol=1e-15)
    assert formulas.yarn_mscale(1.0) == 1.0
    assert formulas.yarn_mscale(0.5) == 1.0


# ---------------------------------------------------------------- factor 1


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_factor_one_is_default_for_every_method(theta, dim, factor, L):
    default = ref_default(theta, dim)
    close(as_np(formulas.linear(theta, dim, 1.0).inv_freq), default)
    close(as_np(formulas.ntk(theta, dim, 1.0).inv_freq), default)
    yarn = formulas.yarn(theta, dim, 1.0, L)
    close(as_np(yarn.inv_freq), default, rtol=1e-15)
    assert yarn.attention_factor == 1.0
    for l in (1, L):
        close(as_np(formulas.dynamic_ntk(theta, dim, 1.0, L, l).inv_freq), default)
    # through the registry, as the patched modules use it
    rope = methods.ModelRope(theta, dim, L)
    for name in ("linear", "ntk", "dynamic-ntk", "yarn"):
        freqs = methods.frequencies(name, methods.validate_params(name, {"factor": 1}), rope, seq_len=L)
        close(as_np(freqs.inv_freq), default, rtol=1e-15)
        assert freqs.attention_factor == 1.0


def test_dynamic_factor_one_still_scales_past_original_length():
    """alpha = l / L when factor = 1: the formula extends even at factor 1 (as transformers does)."""
    theta, dim, L = 10_000.0, 128, 4096
    l = 3 * L
    got = as_np(formulas.dynamic_ntk(theta, dim, 1.0, L, l).inv_freq)
    close(got, ref_default(ref_ntk_base(theta, dim, 3.0), dim))


# ---------------------------------------------------------------- registry path


@pytest.mark.parametrize("theta,dim,factor,L", COMBOS, ids=IDS)
def test_registry_frequencies_match_references(theta, dim, factor, L):
    """methods.frequencies (what ScaledRotaryEmbedding uses) against the references."""
    rope = methods.ModelRope(theta, dim, L)

    def freqs(name, seq_len=None, **params):
        return methods.frequencies(name, methods.validate_params(name, params), rope, seq_len)

    default = ref_default(theta, dim)
    close(as_np(freqs("none").inv_freq), default)
    close(as_np(freqs("linear", factor=factor).inv_freq), default / factor)
    close(as_np(freqs("pi", factor=factor).inv_freq), default / factor)
    close(as_np(freqs("ntk", factor=factor).inv_freq), ref_default(ref_ntk_base(theta, dim, factor), dim))
    l = 3 * L
    close(
        as_np(freqs("dynamic-ntk", seq_len=l, factor=factor).inv_freq),
        ref_default(ref_ntk_base(theta, dim, ref_dynamic_alpha(factor, l, L)), dim),
    )
    # an explicit original length replaces the model's
    close(
        as_np(freqs("dynamic-ntk", seq_len=l, factor=factor, original_max_position_embeddings=L // 2).inv_freq),
        ref_default(ref_ntk_base(theta, dim, ref_dynamic_alpha(factor, l, L // 2)), dim),
    )
    yarn = freqs("yarn", factor=factor)
    close(as_np(yarn.inv_freq), ref_yarn(theta, dim, factor, L)[0])
    yarn_half = freqs("yarn", factor=factor, original_max_position_embeddings=L // 2)
    close(as_np(yarn_half.inv_freq), ref_yarn(theta, dim, factor, L // 2)[0])
