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
