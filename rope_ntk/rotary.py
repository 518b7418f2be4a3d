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

from . import cache as kv
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


def default_step(original_max_position_embeddings: int) -> int:
    """``step`` of cache-consistent dynamic scaling when none is given: 1/64 of the original length.

    The scaling then changes (and cached keys are re-rotated) once every
    L/64 tokens past L, e.g. every 128 tokens for L = 8192.
    """
    return max(1, original_max_position_embeddings // 64)


class ScaledRotaryEmbedding(nn.Module):
    """Rotary embedding for one registry method, static or dynamic.

    Static methods compute their frequencies once. Dynamic methods recompute
    them when the current length (largest position id + 1) changes past the
    original context, and use the buffer computed at the original length at
    or below it, so short inputs are bit-for-bit what the method gives there
    (the default RoPE for dynamic NTK and dynamic YaRN, the short factors
    for LongRoPE). Past it, the length is rounded up to a multiple of the
    method's ``step`` parameter (1: every length).

    ``cache_consistent`` (dynamic methods only): when the scaling in force
    changes between calls that share a KV cache, re-rotate the keys cached
    in the layers ``layer_indices`` (None: all), the first ``rope.dim``
    channels of each head (partial rotary keeps the rest after them), so
    cached decoding equals a full forward; see ``cache.py``. The patched
    model's forward hands the cache over through ``_cache`` around each call.
    """

    def __init__(
        self, method: str, params: dict[str, Any], rope: methods.ModelRope, device=None, layout: str = "half",
        cache_consistent: bool = False, layer_indices: list[int] | None = None,
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
        self.cache_consistent = bool(cache_consistent and self.method.dynamic)
        self.step = int(self.params.get("step") or (default_step(self.original_max_position_embeddings)
                                                    if self.cache_consistent and self.method.param("step") else 1))
        self.channels = slice(0, rope.dim)
        self.layer_indices = layer_indices
        self._cache = None  # the cache of the forward in progress (set by the patcher's hooks)
        self._written: tuple[torch.Tensor, int] | None = None  # positions and length of the last call

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda()/.to_empty() move the buffers, then put float32 back
        # from the float64 masters, always: model.to(torch.bfloat16) would round
        # them and to_empty() (meta-device init) would leave them uninitialized.
        super()._apply(fn, recurse)
        for name, master in self._masters.items():
            current = getattr(self, name)
            if current.device.type != "meta":
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

    def scaling_length(self, position_ids: torch.Tensor) -> int:
        """Length the scaling is computed for: largest position + 1, rounded up to ``step`` past the original."""
        if not self.method.dynamic:
            return 0
        return self.stepped(int(position_ids.max()) + 1)

    def stepped(self, seq_len: int) -> int:
        """``seq_len`` up to the original length, else rounded up to a multiple of ``step``."""
        if seq_len <= self.original_max_position_embeddings:
            return seq_len
        return -(-seq_len // self.step) * self.step

    def scaling_key(self, seq_len: int) -> int:
        """Equal for two lengths with the same scaling (a method without ``step`` switches once)."""
        if not self.method.dynamic or seq_len <= self.original_max_position_embeddings:
            return 0
        return self.stepped(seq_len) if self.method.param("step") else 1

    def scaling_keys(self, lengths: torch.Tensor) -> torch.Tensor:
        """``scaling_key`` of every length in the integer tensor ``lengths``, elementwise."""
        original = self.original_max_position_embeddings
        if not self.method.dynamic:
            return torch.zeros_like(lengths)
        past = lengths > original
        keys = -torch.div(-lengths, self.step, rounding_mode="floor") * self.step if self.method.param("step") else 1
        return torch.where(past, keys, torch.zeros_like(lengths))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        # position_ids: [batch, seq] -> cos, sin: [batch, seq, dim]
        seq_len = self.scaling_length(position_ids)
        if self.cache_consistent:
            if self._cache is not None:
                self._align(self._cache, position_ids, seq_len)
            self._written = (position_ids, seq_len)
        inv_freq, scale = self.frequencies_for(seq_len)
        return rotary_output(position_ids, inv_freq.to(x.device), scale, self.layout, x.dtype)

    def _layers(self, cache) -> list:
        layers = list(cache.layers)
        if self.layer_indices is None:
            return layers
        return [layers[i] for i in self.layer_indices if i < len(layers)]

    def _align(self, cache, position_ids: torch.Tensor, seq_len: int) -> None:
        """Re-rotate ``cache``'s keys to the scaling of ``seq_len`` and record the new positions."""
        layers = [layer for layer in self._layers(cache) if layer.keys is not None and layer.keys.numel()]
        state = kv.states(cache).get(id(self))
        if state is None:
            if layers:
                raise ValueError(
                    f"cache={type(cache).__name__} already holds {kv.seen(layers[0])} tokens that rope_ntk did not "
                    "see being written (filled before patching, or by another model), so it cannot keep their keys "
                    "consistent; start from an empty cache, or patch with cache_consistent=False."
                )
            kv.states(cache)[id(self)] = kv.Rotation(position_ids.detach().clone(), seq_len)
            return
        seen = kv.seen(layers[0]) if layers else 0
        positions = state.positions[:, :seen]  # a cropped cache forgets its last slots
        if state.length != seq_len and layers:
            self._rerotate(layers, positions, state.length, seq_len)
        if positions.shape[0] != position_ids.shape[0]:  # [1, slots] from position_ids=None calls
            batch = max(positions.shape[0], position_ids.shape[0])
            positions, position_ids = positions.expand(batch, -1), position_ids.expand(batch, -1)
        state.positions = torch.cat([positions, position_ids.to(positions.device)], dim=-1)
        state.length = seq_len

    def _rerotate(self, layers: list, positions: torch.Tensor, old_len: int, new_len: int) -> None:
        inv_old, scale_old = self.frequencies_for(old_len)
        inv_old = inv_old.clone()
        inv_new, scale_new = self.frequencies_for(new_len)
        if scale_old == scale_new and torch.equal(inv_old, inv_new):
            return  # e.g. LongRoPE past the switch, dynamic YaRN past its cap
        tables: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        for layer in layers:
            slots = kv.slot_positions(layer, positions)
            key = (kv.seen(layer) - layer.keys.shape[-2], layer.keys.shape[-2], layer.keys.device)
            if key not in tables:
                # the angles a full forward forms, minus those the keys were rotated by: [batch, slots, dim/2]
                where = slots.to(layer.keys.device)[..., None].to(torch.float32)
                tables[key] = where * inv_new.to(where.device) - where * inv_old.to(where.device)
            kv.rotate_keys(layer.keys, tables[key], scale_new / scale_old, self.layout, self.channels)

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
            **({"cache_consistent": self.cache_consistent, "step": self.step} if self.method.dynamic else {}),
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
