"""ntk-by-parts, dynamic-yarn, llama3, longrope and YaRN's mscale options.

Each is checked against the float64 references of tests/reference.py and,
where transformers has the method natively (llama3, longrope, yarn with
mscale / mscale_all_dim / attention_factor / truncate), against its
``ROPE_INIT_FUNCTIONS`` and against the ``rope_parameters`` rope_ntk records.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import (
    ref_default,
    ref_dynamic_yarn,
    ref_llama3,
    ref_longrope,
    ref_rotations,
    ref_yarn,
    ref_yarn_attention,
)
from test_parity_transformers import assert_freqs_close, hf_config, hf_frequencies, hf_rope
from tiny import TRANSFORMERS_4

from rope_ntk import InvalidParameterError, formulas, methods

# (rope_theta, dim, factor, L)
COMBOS = [
    (10_000.0, 128, 4.0, 4096),
    (500_000.0, 128, 8.0, 8192),  # Llama 3.1
    (100_000.0, 64, 2.0, 8192),
    (10_000.0, 32, 16.0, 2048),
]
IDS = [f"theta{int(t)}-d{d}-s{s:g}-L{L}" for t, d, s, L in COMBOS]
TIGHT = dict(rtol=1e-12, atol=0.0)


def freqs(name, rope, seq_len=None, **params):
    return methods.frequencies(name, methods.validate_params(name, params), rope, seq_len)


def np64(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float64
    return t.numpy()


# ---------------------------------------------------------------- ntk-by-parts


@pytest.mark.parametrize("theta,dim,s,L", COMBOS, ids=IDS)
def test_ntk_by_parts_is_yarn_frequencies_without_temperature(theta, dim, s, L):
    got = freqs("ntk-by-parts", methods.ModelRope(theta, dim, L), factor=s)
    np.testing.assert_allclose(np64(got.inv_freq), ref_yarn(theta, dim, s, L)[0], **TIGHT)
    assert got.attention_factor == 1.0
    # not the default: the slowest pair is divided by the factor when it turns < 1 time in L
    if ref_rotations(theta, dim, L)[-1] < 1:
        assert math.isclose(got.inv_freq[-1].item(), ref_default(theta, dim)[-1] / s, rel_tol=1e-12)


def test_ntk_by_parts_options_reach_the_ramp():
    rope = methods.ModelRope(10_000.0, 64, 4096)
    got = freqs("ntk-by-parts", rope, factor=4, beta_fast=8, beta_slow=2, truncate=False)
    np.testing.assert_allclose(np64(got.inv_freq), ref_yarn(10_000.0, 64, 4.0, 4096, 8.0, 2.0, False)[0], **TIGHT)


# ---------------------------------------------------------------- YaRN mscale options


@pytest.mark.parametrize(
    "mscale,mscale_all_dim", [(None, None), (1.0, 1.0), (0.707, 0.707), (1.0, 0.5), (2.0, 1.0), (0.8, None), (None, 1.0)]
)
@pytest.mark.parametrize("s", [1.0, 4.0, 40.0])
def test_yarn_attention_factor_with_mscale(s, mscale, mscale_all_dim):
    rope = methods.ModelRope(10_000.0, 64, 4096)
    params = {k: v for k, v in {"mscale": mscale, "mscale_all_dim": mscale_all_dim}.items() if v is not None}
    got = freqs("yarn", rope, factor=s, **params)
    assert math.isclose(got.attention_factor, ref_yarn_attention(s, mscale, mscale_all_dim), rel_tol=1e-14)
    # mscale changes only the attention factor, never the frequencies
    np.testing.assert_allclose(np64(got.inv_freq), ref_yarn(10_000.0, 64, s, 4096)[0], **TIGHT)
    # an explicit attention_factor wins over mscale
    assert freqs("yarn", rope, factor=s, attention_factor=0.9, **params).attention_factor == 0.9


def test_yarn_mscale_equal_pair_cancels():
    """DeepSeek-V3 ships mscale == mscale_all_dim: cos/sin are not scaled (the softmax is, in attention)."""
    rope = methods.ModelRope(10_000.0, 64, 4096)
    assert freqs("yarn", rope, factor=40, mscale=1.0, mscale_all_dim=1.0).attention_factor == 1.0


YARN_HF_CASES = [
    {"factor": 4.0},
    {"factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 8.0, "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 16.0},
    {"factor": 4.0, "attention_factor": 1.3, "truncate": False},
    {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": False},
]


@pytest.mark.parametrize("params", YARN_HF_CASES, ids=[str(p) for p in YARN_HF_CASES])
@pytest.mark.parametrize("theta,head_dim,L", [(10_000.0, 64, 4096), (500_000.0, 128, 8192)])
def test_yarn_options_match_transformers(theta, head_dim, L, params):
    theirs, their_factor = hf_frequencies(hf_config(theta, head_dim, 1.0, L, "yarn", **params))
    ours = freqs("yarn", methods.ModelRope(theta, head_dim, L), **params)
    assert_freqs_close(ours.inv_freq, theirs)
    assert ours.attention_factor == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize("lone", [{"mscale": 0.8}, {"mscale_all_dim": 1.0}])
def test_lone_mscale_is_recorded_as_explicit_attention_factor(lone):
    """transformers ignores a lone mscale knob; rope_ntk writes the factor it used, so a reload agrees."""
    theta, head_dim, L = 10_000.0, 64, 4096
    rope = methods.ModelRope(theta, head_dim, L)
    resolved = methods.validate_params("yarn", {"factor": 8.0, **lone})
    ours = methods.frequencies("yarn", resolved, rope)
    assert not math.isclose(ours.attention_factor, 0.1 * math.log(8) + 1, rel_tol=1e-6)  # it does differ
    recorded = methods.to_hf("yarn", resolved, rope)
    assert recorded["attention_factor"] == pytest.approx(ours.attention_factor, rel=1e-15)
    config = hf_config(theta, head_dim, 1.0, L, **{k: v for k, v in recorded.items() if k != "rope_theta"})
    theirs, their_factor = hf_frequencies(config)
    assert_freqs_close(ours.inv_freq, theirs)
    assert their_factor == pytest.approx(ours.attention_factor, rel=1e-12)


# ---------------------------------------------------------------- dynamic YaRN


@pytest.mark.parametrize("theta,dim,s,L", COMBOS, ids=IDS)
def test_dynamic_yarn_follows_length(theta, dim, s, L):
    rope = methods.ModelRope(theta, dim, L)
    for seq_len in (1, L // 2, L):
        got = freqs("dynamic-yarn", rope, seq_len)
        assert torch.equal(got.inv_freq, formulas.default(theta, dim).inv_freq)
        assert got.attention_factor == 1.0
    for seq_len in (L + 1, 3 * L // 2, 3 * L, 10 * L):
        want, attention = ref_dynamic_yarn(theta, dim, seq_len, L)
        got = freqs("dynamic-yarn", rope, seq_len)
        np.testing.assert_allclose(np64(got.inv_freq), want, **TIGHT)
        assert math.isclose(got.attention_factor, attention, rel_tol=1e-14)
        capped = freqs("dynamic-yarn", rope, seq_len, factor=s)
        want, attention = ref_dynamic_yarn(theta, dim, seq_len, L, cap=s)
        np.testing.assert_allclose(np64(capped.inv_freq), want, **TIGHT)
        assert math.isclose(capped.attention_factor, attention, rel_tol=1e-14)
    # at l = 3L it is exactly the static YaRN of factor 3
    static = freqs("yarn", rope, factor=3.0)
    assert torch.equal(freqs("dynamic-yarn", rope, 3 * L).inv_freq, static.inv_freq)


# ---------------------------------------------------------------- llama3


@pytest.mark.parametrize("theta,dim,s,L", COMBOS, ids=IDS)
@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0), (0.5, 1.5)])
def test_llama3_matches_reference_and_transformers(theta, dim, s, L, low, high):
    rope = methods.ModelRope(theta, dim, L)
    got = freqs("llama3", rope, factor=s, low_freq_factor=low, high_freq_factor=high)
    want = ref_llama3(theta, dim, s, L, low, high)
    np.testing.assert_allclose(np64(got.inv_freq), want, **TIGHT)
    assert got.attention_factor == 1.0
    # the three regimes are all exercised somewhere in COMBOS x (low, high); each pair is one of them
    ratio = ref_default(theta, dim) / want
    assert np.all((ratio >= 1 - 1e-12) & (ratio <= s * (1 + 1e-12)))

    config = hf_config(
        theta, dim, 1.0, L, "llama3", factor=s, low_freq_factor=low, high_freq_factor=high
    )
    hf_rope(config)["original_max_position_embeddings"] = L
    theirs, their_factor = hf_frequencies(config)
    assert_freqs_close(got.inv_freq, theirs)
    assert their_factor == 1.0


def test_llama3_31_defaults_have_all_three_regimes():
    theta, dim, s, L = 500_000.0, 128, 8.0, 8192
    got = np64(freqs("llama3", methods.ModelRope(theta, dim, L), factor=s).inv_freq)
    ratio = ref_default(theta, dim) / got
    assert (np.isclose(ratio, 1.0, rtol=1e-12)).sum() > 0  # kept
    assert (np.isclose(ratio, s, rtol=1e-12)).sum() > 0  # divided by factor
    assert ((ratio > 1 + 1e-9) & (ratio < s - 1e-9)).sum() > 0  # blended


# ---------------------------------------------------------------- longrope


def longrope_lists(dim, seed=0):
    generator = np.random.default_rng(seed)
    short = list(1.0 + generator.random(dim // 2) * 0.1)
    long = list(1.0 + np.sort(generator.random(dim // 2)) * 30.0)
    return short, long


@pytest.mark.parametrize("theta,dim,s,L", COMBOS, ids=IDS)
def test_longrope_matches_reference_and_transformers(theta, dim, s, L):
    short, long = longrope_lists(dim)
    rope = methods.ModelRope(theta, dim, L, max_position_embeddings=int(s * L))
    resolved = methods.validate_params("longrope", {"short_factor": short, "long_factor": long})
    config = hf_config(theta, dim, 1.0, L, "longrope", short_factor=short, long_factor=long)
    hf_rope(config)["original_max_position_embeddings"] = L
    if TRANSFORMERS_4:  # 4.x's longrope reads the original length only from the top-level attribute (Phi-3's)
        config.original_max_position_embeddings = L
    config.max_position_embeddings = int(s * L)  # factor defaults to max / original, as in Phi-3
    for seq_len in (None, L // 2, L, L + 1, 4 * L):
        got = methods.frequencies("longrope", resolved, rope, seq_len)
        want, attention = ref_longrope(theta, dim, short, long, seq_len or L, L, s)
        np.testing.assert_allclose(np64(got.inv_freq), want, **TIGHT)
        assert math.isclose(got.attention_factor, attention, rel_tol=1e-14)
        theirs, their_factor = hf_frequencies(config, seq_len)
        assert_freqs_close(got.inv_freq, theirs)
        assert got.attention_factor == pytest.approx(their_factor, rel=1e-12)
    # an explicit factor and attention_factor are used as given
    explicit = methods.validate_params("longrope", {"short_factor": short, "long_factor": long, "factor": 2})
    assert math.isclose(
        methods.frequencies("longrope", explicit, rope).attention_factor,
        math.sqrt(1 + math.log(2) / math.log(L)),
        rel_tol=1e-14,
    )


def test_longrope_list_length_must_match_the_model():
    short, long = longrope_lists(64)
    rope = methods.ModelRope(10_000.0, 32, 4096)
    resolved = methods.validate_params("longrope", {"short_factor": short, "long_factor": long})
    with pytest.raises(InvalidParameterError, match=r"short_factor has 32 values .* needs 16") as info:
        methods.check_model("longrope", resolved, rope)
    assert "long_factor has 32 values" in str(info.value)
    methods.check_model("longrope", resolved, methods.ModelRope(10_000.0, 64, 4096))  # fits


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"short_factor": [1.0], "long_factor": "2"}, "long_factor='2'"),
        ({"short_factor": [], "long_factor": [1.0]}, "short_factor=[]"),
        ({"short_factor": [1.0, -1.0], "long_factor": [1.0, 1.0]}, "short_factor[1]=-1.0"),
        ({"short_factor": [1.0, "x"], "long_factor": [1.0, 1.0]}, "short_factor[1]='x'"),
        ({"long_factor": [1.0]}, "needs short_factor"),
    ],
)
def test_longrope_bad_lists(params, fragment):
    with pytest.raises(InvalidParameterError) as info:
        methods.validate_params("longrope", params)
    assert fragment in str(info.value) and "'longrope'" in str(info.value)


@pytest.mark.parametrize(
    "method,params,fragments",
    [
        ("llama3", {"factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}, ["high_freq_factor=4", "low_freq_factor=4"]),
        ("llama3", {"factor": 8, "low_freq_factor": 0}, ["low_freq_factor=0"]),
        ("ntk-by-parts", {"factor": 2, "beta_fast": 1, "beta_slow": 2}, ["beta_fast=1", "beta_slow=2"]),
        ("dynamic-yarn", {"factor": 0.5}, ["factor=0.5", ">= 1"]),
        ("yarn", {"factor": 2, "mscale": 0}, ["mscale=0"]),
        ("yarn", {"factor": 2, "mscale_all_dim": -1}, ["mscale_all_dim=-1"]),
    ],
)
def test_new_methods_bad_values(method, params, fragments):
    with pytest.raises(InvalidParameterError) as info:
        methods.validate_params(method, params)
    for fragment in fragments + [repr(method)]:
        assert fragment in str(info.value)


# ---------------------------------------------------------------- factor 1


def test_factor_one_is_default_for_new_methods():
    theta, dim, L = 10_000.0, 64, 4096
    rope = methods.ModelRope(theta, dim, L)
    default = ref_default(theta, dim)
    for name in ("ntk-by-parts", "llama3", "yarn"):
        got = freqs(name, rope, factor=1)
        np.testing.assert_allclose(np64(got.inv_freq), default, rtol=1e-15)
        assert got.attention_factor == 1.0
    ones = [1.0] * (dim // 2)
    got = freqs("longrope", rope, 2 * L, short_factor=ones, long_factor=ones, factor=1)
    np.testing.assert_allclose(np64(got.inv_freq), default, rtol=1e-15)
    assert got.attention_factor == 1.0
