"""Closed-form RoPE references in float64 numpy, typed from the papers.

They call nothing in rope_ntk, so tests can compare rope_ntk against them.
"""

from __future__ import annotations

import math

import numpy as np


def ref_default(theta: float, dim: int) -> np.ndarray:
    i = np.arange(dim // 2, dtype=np.float64)
    return theta ** (-2.0 * i / dim)


def ref_rotations(theta: float, dim: int, L: int) -> np.ndarray:
    """How many full turns each pair makes over L positions."""
    return L * ref_default(theta, dim) / (2 * math.pi)


def ref_ntk_base(theta: float, dim: int, alpha: float) -> float:
    return theta * alpha ** (dim / (dim - 2))


def ref_dynamic_alpha(s: float, l: int, L: int) -> float:
    return s * l / L - (s - 1)


def ref_yarn(theta, dim, s, L, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN inverse frequencies and attention factor, from the paper."""

    def pair_turning(r):  # pair index i with L * theta_i / (2 pi) == r
        return dim * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    gamma = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    base_freq = ref_default(theta, dim)
    inv = base_freq * (1 - gamma) + (base_freq / s) * gamma
    return inv, (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)


def ref_mscale(s, m=1.0):
    return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0


def ref_yarn_attention(s, mscale=None, mscale_all_dim=None):
    """DeepSeek-V2 reference: mscale(s, mscale) / mscale(s, mscale_all_dim), defaults 1 and 0."""
    return ref_mscale(s, 1.0 if mscale is None else mscale) / ref_mscale(s, 0.0 if mscale_all_dim is None else mscale_all_dim)


def ref_llama3(theta, dim, s, L, low=1.0, high=4.0):
    """Meta's apply_scaling, by wavelength: keep short waves, divide long ones, blend between."""
    out = []
    for f in ref_default(theta, dim):
        wavelength = 2 * math.pi / f
        if wavelength < L / high:
            out.append(f)
        elif wavelength > L / low:
            out.append(f / s)
        else:
            smooth = (L / wavelength - low) / (high - low)
            out.append((1 - smooth) * f / s + smooth * f)
    return np.array(out)


def ref_longrope(theta, dim, short, long, seq_len, L, s):
    """Phi-3 LongRoPE: per-pair divisors, long ones past L; attention sqrt(1 + ln s / ln L)."""
    lambdas = np.asarray(long if seq_len > L else short, dtype=np.float64)
    attention = math.sqrt(1 + math.log(s) / math.log(L)) if s > 1 else 1.0
    return ref_default(theta, dim) / lambdas, attention


def ref_dynamic_yarn(theta, dim, seq_len, L, cap=None):
    """YaRN with s = max(1, l / L) (capped at ``cap`` if given); the default RoPE at s = 1."""
    s = max(1.0, seq_len / L)
    if cap is not None:
        s = min(s, cap)
    if s == 1.0:
        return ref_default(theta, dim), 1.0
    return ref_yarn(theta, dim, s, L)
