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
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # one-pair ramp: avoid a zero division, as the paper's code
    pairs = torch.arange(dim // 2, dtype=torch.float64)
    return ((pairs - low) / (high - low)).clamp(0.0, 1.0)


def yarn(
    rope_theta: float,
    dim: int,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> RopeFrequencies:
    """YaRN (Peng et al. 2023, arXiv:2309.00071, eqs. 18-22).

    inv_freq = (1 - gamma) * inv_freq + gamma * inv_freq / factor, with the
    ramp gamma of ``yarn_ramp``; cos and sin are multiplied by
    ``attention_factor`` = 0.1 ln(factor) + 1 unless one is given.
    """
    inv_freq = default_inv_freq(rope_theta, dim)
    gamma = yarn_ramp(dim, rope_theta, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    scaled = inv_freq * (1 - gamma) + (inv_freq / factor) * gamma
    if attention_factor is None:
        attention_factor = yarn_mscale(factor)
    return RopeFrequencies(scaled, float(attention_factor))
