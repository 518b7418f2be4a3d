"""Pure RoPE math: model numbers in, ``(inv_freq, attention_factor)`` out.

Every function here is free of ``nn.Module`` state and of any model object.
Inputs use Hugging Face's names (``rope_theta``, ``factor``,
``original_max_position_embeddings``, ``attention_factor``); inside, the base
is ``base`` and ``dim`` is the number of rotated channels of one head (the
head width times the partial-rotary fraction), so there are ``dim // 2``
frequency pairs.

Frequencies are computed in float64 and returned as float64 tensors; the
rotary module casts them to float32 once. Angles (position x inv_freq) are
always formed in float32 by the caller, never in the model's dtype: in
bfloat16 a position above 256 cannot even be represented exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeFrequencies:
    """What a RoPE method produces for one rotary module.

    ``inv_freq`` has shape ``[dim // 2]`` (float64). ``attention_factor``
    multiplies cos and sin, so q.k logits scale by its square.
    """

    inv_freq: torch.Tensor
    attention_factor: float = 1.0


def default_inv_freq(rope_theta: float, dim: int) -> torch.Tensor:
    """Unscaled RoPE (Su et al. 2021, arXiv:2104.09864, eq. 15).

    inv_freq[i] = rope_theta ** (-2i / dim), i = 0 .. dim/2 - 1.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (float(rope_theta) ** exponents)


def default(rope_theta: float, dim: int) -> RopeFrequencies:
    """The model's own RoPE, unscaled (used as the ``none`` baseline)."""
    return RopeFrequencies(default_inv_freq(rope_theta, dim))


def linear(rope_theta: float, dim: int, factor: float) -> RopeFrequencies:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595, eq. 4).

    Positions are divided by ``factor``; since the angle is
    position x inv_freq, dividing every frequency by ``factor`` is the same.
    """
    return RopeFrequencies(default_inv_freq(rope_theta, dim) / factor)


def ntk_base(rope_theta: float, dim: int, alpha: float) -> float:
    """NTK-aware base (bloc97, 2023; YaRN paper arXiv:2309.00071, eq. 16).

    base' = base * alpha ** (dim / (dim - 2)). The exponent makes the lowest
    frequency exactly ``alpha`` times slower while the highest is unchanged.
    """
    return float(rope_theta) * float(alpha) ** (dim / (dim - 2))


def ntk(rope_theta: float, dim: int, alpha: float) -> RopeFrequencies:
    """Static NTK-aware scaling: the default RoPE with base ``ntk_base``.

    ``alpha`` is the NTK scale of the formula; the public API also accepts
    ``factor`` and uses alpha = factor.
    """
    return RopeFrequencies(default_inv_freq(ntk_base(rope_theta, dim, alpha), dim))


def dynamic_ntk_alpha(factor: float, seq_len: int, original_max_position_embeddings: int) -> float:
    """Scale of dynamic NTK (emozilla, 2023; as in transformers' ``dynamic``).

    alpha = factor * seq_len / L - (factor - 1), L the original context,
    so alpha = 1 at seq_len = L and grows by ``factor`` per further L:
    alpha = factor at seq_len = (2 - 1/factor) * L, and
    factor**2 - factor + 1 (not factor) at seq_len = factor * L.
    """
    return factor * seq_len / original_max_position_embeddings - (factor - 1)


def dynamic_ntk(
    rope_theta: float,
    dim: int,
    factor: float,
    original_max_position_embeddings: int,
    seq_len: int,
) -> RopeFrequencies:
    """Dynamic NTK: NTK-aware scaling whose alpha follows the current length.

    At or below ``original_max_position_embeddings`` the result is the
    default RoPE exactly (same function, same inputs).
    """
    if seq_len <= original_max_position_embeddings:
        return default(rope_theta, dim)
    alpha = dynamic_ntk_alpha(factor, seq_len, original_max_position_embeddings)
    return ntk(rope_theta, dim, alpha)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term (arXiv:2309.00071, eq. 22).

    sqrt(1/t) = 0.1 * mscale * ln(factor) + 1, and 1 for factor <= 1.
    """
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """cos/sin multiplier of YaRN with DeepSeek's two temperature knobs.

    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim), as in
    the DeepSeek-V2 reference code (arXiv:2405.04434, whose configs carry
    ``mscale`` and ``mscale_all_dim``). The defaults (1, 0) give the paper's
    0.1 ln(factor) + 1. Models that also scale the softmax by
    yarn_mscale(factor, mscale_all_dim)**2 (DeepSeek) do so in attention,
    outside this function.

    Deviation from transformers: it applies the ratio only when both knobs
    are given and ignores a lone one; rope_ntk always applies the ratio and
    records the resulting ``attention_factor`` explicitly in the config.
    """
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_position_embeddings: int) -> float:
    """Pair index whose wavelength fits ``num_rotations`` times in L.

    Solves L / (2 pi base^(2i/dim)) = num_rotations for i (YaRN, sec. 3.2).
    """
    turns = original_max_position_embeddings / (num_rotations * 2 * math.pi)
    return dim * math.log(turns) / (2 * math.log(base))


def yarn_ramp(
    dim: int,
    rope_theta: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """NTK-by-parts ramp gamma(i), shape ``[dim // 2]``, float64.

    gamma = 0 for pairs that rotate more than ``beta_fast`` times in L (kept
    as they are: extrapolation), 1 for pairs that rotate fewer than
    ``beta_slow`` times (fully interpolated), linear in between.
    ``truncate`` rounds the bounds outward to whole pairs, as the YaRN
    reference code does.
    """
    low = yarn_correction_dim(beta_fast, dim, rope_theta, original_max_position_embeddings)
    high = yarn_correction_dim(beta_slow, dim, rope_theta, original_max_position_embeddings)
    # clamp both bounds into [0, dim - 1] first, then round (the same for bounds inside): a beta
    # near 0 puts a bound at infinity
    low, high = min(max(low, 0), dim - 1), max(min(high, dim - 1), 0)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    if low == high:
        high += 0.001  # one-pair ramp: avoid a zero division, as the paper's code
    pairs = torch.arange(dim // 2, dtype=torch.float64)
    return ((pairs - low) / (high - low)).clamp(0.0, 1.0)


def ntk_by_parts(
    rope_theta: float,
    dim: int,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> RopeFrequencies:
    """NTK-by-parts (bloc97 2023; YaRN paper arXiv:2309.00071, eqs. 17-18).

    inv_freq = (1 - gamma) * inv_freq + gamma * inv_freq / factor with the
    ramp gamma of ``yarn_ramp``: fast pairs keep their frequency, slow pairs
    are interpolated like ``linear``. No attention temperature (factor 1):
    that is what YaRN adds on top.
    """
    inv_freq = default_inv_freq(rope_theta, dim)
    gamma = yarn_ramp(dim, rope_theta, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    return RopeFrequencies(inv_freq * (1 - gamma) + (inv_freq / factor) * gamma)


def yarn(
    rope_theta: float,
    dim: int,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
    mscale: float = 1.0,
    mscale_all_dim: float = 0.0,
) -> RopeFrequencies:
    """YaRN (Peng et al. 2023, arXiv:2309.00071, eqs. 18-22).

    The ``ntk_by_parts`` frequencies; cos and sin are multiplied by
    ``attention_factor``, by default ``yarn_attention_factor`` (the paper's
    0.1 ln(factor) + 1 unless ``mscale`` / ``mscale_all_dim`` are changed).
    """
    parts = ntk_by_parts(rope_theta, dim, factor, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    if attention_factor is None:
        attention_factor = yarn_attention_factor(factor, mscale, mscale_all_dim)
    return RopeFrequencies(parts.inv_freq, float(attention_factor))


def dynamic_yarn_factor(original_max_position_embeddings: int, seq_len: int, factor: float | None = None) -> float:
    """Scale of dynamic YaRN at the current length (YaRN paper sec. 3.3, eq. 25).

    s = max(1, seq_len / L). Deviation: a given ``factor`` caps s, so the
    scaling stops growing at factor * L (a static YaRN of that factor).
    """
    scale = max(1.0, seq_len / original_max_position_embeddings)
    return scale if factor is None else min(scale, factor)


def dynamic_yarn(
    rope_theta: float,
    dim: int,
    original_max_position_embeddings: int,
    seq_len: int,
    factor: float | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    mscale: float = 1.0,
    mscale_all_dim: float = 0.0,
) -> RopeFrequencies:
    """Dynamic YaRN: ``yarn`` with the scale of ``dynamic_yarn_factor``.

    At or below ``original_max_position_embeddings`` the result is the
    default RoPE exactly, with attention factor 1.
    """
    scale = dynamic_yarn_factor(original_max_position_embeddings, seq_len, factor)
    if scale <= 1.0:
        return default(rope_theta, dim)
    return yarn(
        rope_theta, dim, scale, original_max_position_embeddings, beta_fast, beta_slow, None, truncate,
        mscale, mscale_all_dim,
    )


def llama3(
    rope_theta: float,
    dim: int,
    factor: float,
    original_max_position_embeddings: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> RopeFrequencies:
    """Llama 3.1 scaling (Meta 2024, "The Llama 3 Herd of Models",
    arXiv:2407.21783; the formula is in Meta's reference ``apply_scaling``).

    With r_i = L * inv_freq_i / (2 pi) the turns of pair i in L: pairs with
    r_i > ``high_freq_factor`` are kept, pairs with r_i < ``low_freq_factor``
    are divided by ``factor``, and in between
    inv_freq * (w + (1 - w) / factor), w = (r_i - low) / (high - low) —
    an NTK-by-parts ramp in turns, without YaRN's rounding. Defaults are
    Llama 3.1's (factor 8, low 1, high 4, L = 8192).
    """
    inv_freq = default_inv_freq(rope_theta, dim)
    turns = original_max_position_embeddings * inv_freq / (2 * math.pi)
    weight = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return RopeFrequencies(inv_freq * (weight + (1 - weight) / factor))


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """LongRoPE / Phi-3 cos-sin multiplier: sqrt(1 + ln(factor) / ln(L)), 1 for factor <= 1."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def longrope(
    rope_theta: float,
    dim: int,
    rescale: list[float] | tuple[float, ...],
    attention_factor: float = 1.0,
) -> RopeFrequencies:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753, eq. 3): one searched
    rescale factor per pair, inv_freq_i / lambda_i.

    The caller picks ``short_factor`` or ``long_factor`` as ``rescale`` by
    the current length (Phi-3's convention: long above the original
    context) and the attention factor (``longrope_attention_factor``).
    """
    lambdas = torch.tensor([float(x) for x in rescale], dtype=torch.float64)
    return RopeFrequencies(default_inv_freq(rope_theta, dim) / lambdas, float(attention_factor))
