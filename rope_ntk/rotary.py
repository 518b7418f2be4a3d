"""One scaled rotary module that stands in for a Hugging Face one.

It returns what the replaced module returned, in the family's layout (see
``LAYOUTS``), multiplied by the attention factor and cast to the input
dtype, so the attention code of the model runs unchanged.

Precision: ``inv_freq`` stays float32 whatever ``model.to(dtype)`` does
(``_apply`` restores it from a float64 master copy) and angles are formed in
float32, because bfloat16 cannot represent positions above 256 exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import methods
from .formulas import RopeFrequencies

# How a family's attention code expects the per-pair angles, freqs [batch, seq, dim/2]:
#   "half":        (cos, sin) of cat(freqs, freqs)   [batch, seq, dim]   Llama, Mistral, ...
#   "interleaved": (cos, sin) of [f0, f0, f1, f1 ...] [batch, seq, dim]  Cohere
#   "sin-cos":     (sin, cos) of freqs               [batch, seq, dim/2] GPT-J (repeats them itself)
LAYOUTS = ("half", "interleaved", "sin-cos")


def rotary_output(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float, layout: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a rotary module of ``layout`` returns for float32 ``inv_freq``."""
    # [batch, seq, 1] * [dim/2] -> [batch, seq, dim/2]
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    if layout == "half":
        freqs = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, dim]
    elif layout == "interleaved":
        freqs = freqs.repeat_interleave(2, dim=-1)  # [batch, seq, dim]
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    if layout == "sin-cos":
        return sin.to(dtype), cos.to(dtype)
    return cos.to(dtype), sin.to(dtype)


class ScaledRotaryEmbedding(nn.Module):
    """Rotary embedding for one registry method, static or dynamic.

    Static methods compute their frequencies once. Dynamic methods recompute
    them when the current length (largest position id + 1) changes past the
    original context, and use the buffer computed at the original length at
    or below it, so short inputs are bit-for-bit what the method gives there
    (the default RoPE for dynamic NTK and dynamic YaRN, the short factors
    for LongRoPE).
    """

    def __init__(
        self, method: str, params: dict[str, Any], rope: methods.ModelRope, device=None, layout: str = "half"
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not a rotary layout; valid: {', '.join(LAYOUTS)}.")
        self.method = methods.get_method(method)
        self.params = methods.validate_params(self.method, params)
        methods.check_model(self.method, self.params, rope)
        self.rope = rope
        self.layout = layout
        self.original_max_position_embeddings = int(
            self.params.get("original_max_position_embeddings") or rope.original_max_position_embeddings
        )
        static = methods.frequencies(self.method, self.params, rope)
        self._masters = {"inv_freq": static.inv_freq, "default_inv_freq": methods.frequencies("none", {}, rope).inv_freq}
        self.attention_scaling = static.attention_factor
        self.inv_freq = nn.Buffer(static.inv_freq.to(device=device, dtype=torch.float32), persistent=False)
        self.default_inv_freq = nn.Buffer(
            self._masters["default_inv_freq"].to(device=device, dtype=torch.float32), persistent=False
        )
        self._dynamic_len: int | None = None  # length the dynamic buffer was built for
        self._dynamic = (self.inv_freq, self.attention_scaling)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda() move the buffers, then put float32 back from the
        # float64 masters so that model.to(torch.bfloat16) cannot round them.
        super()._apply(fn, recurse)
        for name, master in self._masters.items():
            current = getattr(self, name)
            if current.dtype != torch.float32:
                setattr(self, name, master.to(device=current.device, dtype=torch.float32))
        self._dynamic_len = None
        return self

    def frequencies_for(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """Float32 ``inv_freq`` and attention factor in force at ``seq_len``."""
        if not self.method.dynamic:
            return self.inv_freq, self.attention_scaling
        if seq_len <= self.original_max_position_embeddings:
            return self.inv_freq, self.attention_scaling
        if seq_len != self._dynamic_len:
            freqs: RopeFrequencies = methods.frequencies(self.method, self.params, self.rope, seq_len)
            device = self.default_inv_freq.device
            self._dynamic = (freqs.inv_freq.to(device=device, dtype=torch.float32), freqs.attention_factor)
            self._dynamic_len = seq_len
        return self._dynamic

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        # position_ids: [batch, seq] -> cos, sin: [batch, seq, dim]
        seq_len = int(position_ids.max()) + 1 if self.method.dynamic else 0
        inv_freq, scale = self.frequencies_for(seq_len)
        return rotary_output(position_ids, inv_freq.to(x.device), scale, self.layout, x.dtype)

    def describe(self) -> dict[str, Any]:
        """Method, parameters and model numbers of this module, JSON-ready."""
        return {
            "method": self.method.name,
            "params": dict(self.params),
            "rope_theta": self.rope.rope_theta,
            "dim": self.rope.dim,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "attention_factor": self.attention_scaling,
            "layout": self.layout,
        }

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"method={self.method.name}, {params}, dim={self.rope.dim}, rope_theta={self.rope.rope_theta:g}"


class LayerTypeRotary(nn.Module):
    """Stands in for a rotary module that keeps one RoPE per layer type (Gemma 3).

    Called as ``(x, position_ids, layer_type)`` like the module it replaces;
    each layer type has its own ``ScaledRotaryEmbedding`` (scaled, or the
    ``none`` method with that layer type's own base).
    """

    def __init__(self, by_type: dict[str, ScaledRotaryEmbedding]):
        super().__init__()
        self.by_type = nn.ModuleDict(by_type)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
        return self.by_type[layer_type](x, position_ids)
