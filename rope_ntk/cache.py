"""Dynamic RoPE scaling that gives the same logits with and without a KV cache (issue 4).

Dynamic NTK, dynamic YaRN and LongRoPE pick their frequencies from the
current length. transformers rotates every token of an input for the whole
input's length, and a cache keeps keys rotated for the length at which they
were written, so past the original context cached decoding drifts from a
full forward. Re-rotating cached keys cannot close that gap on its own:
past the first layer, the hidden states (so keys and values) of earlier
tokens depend on the scaling they were computed with.

The consistent mode therefore makes the scaling causal: token i uses the
scaling of its own prefix length (largest position so far + 1, rounded up
to the method's ``step``), so no token depends on later ones, and keeps the
cache exact by re-rotating cached keys whenever the scaling changes:

    k_new = (a_new / a_old) * R(phi_new - phi_old) k_cached

with phi = position * inv_freq, a the attention factor (it multiplies cos
and sin) and R the rotation of the family's pair layout. Rotations compose,
so this is exact up to float rounding. An input spanning several scalings
runs as consecutive chunks through a cache (``wrap_forward``). Caching keys
before RoPE instead would rotate the whole cache on every step; re-rotating
only on a change, once per ``step`` tokens, costs far less.

The cache carries what re-rotation needs in ``cache._rope_ntk_rotations``,
keyed by the rotary module: the position of every slot for every batch row
(left padding gives rows different positions) and the length its keys are
rotated for. Supported: ``DynamicCache`` with full and sliding-window layers
(what ``generate`` builds by default; offloading is untested). Static and quantized
caches raise ``NotImplementedError``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

STATE_ATTR = "_rope_ntk_rotations"
# cache layer classes whose .keys is a plain [batch, kv_heads, slots, head_dim] tensor, in position order
SUPPORTED_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


@dataclass
class Rotation:
    """What one rotary module wrote into one cache."""

    positions: torch.Tensor  # [batch or 1, slots] position id of every slot written, in order
    length: int  # scaling length the cached keys are rotated for


def states(cache) -> dict[int, Rotation]:
    found = getattr(cache, STATE_ATTR, None)
    if found is None:
        found = {}
        setattr(cache, STATE_ATTR, found)
    return found


def check_cache(cache) -> None:
    """Refuse caches whose keys rope_ntk cannot re-rotate in place."""
    bad = sorted({type(layer).__name__ for layer in getattr(cache, "layers", ())} - set(SUPPORTED_LAYERS))
    if not hasattr(cache, "layers") or bad:
        what = ", ".join(bad) if bad else "no .layers"
        raise NotImplementedError(
            f"cache_consistent=True with a {type(cache).__name__} ({what}): rope_ntk re-rotates cached keys only in "
            "transformers' DynamicCache (full and sliding-window layers). Use DynamicCache (generate's default), "
            "or patch with cache_consistent=False for the legacy behaviour."
        )


def seen(layer) -> int:
    """Tokens written into a cache layer so far (a sliding layer keeps only the last ones)."""
    if layer.keys is None or layer.keys.numel() == 0:
        return 0
    if getattr(layer, "is_sliding", False):
        return int(layer.cumulative_length)
    return layer.keys.shape[-2]


def slot_positions(layer, positions: torch.Tensor) -> torch.Tensor:
    """Positions of the slots a layer holds: [batch or 1, slots]."""
    kept, written = layer.keys.shape[-2], seen(layer)
    return positions[:, written - kept : written]


def rotate_keys(keys: torch.Tensor, angles: torch.Tensor, ratio: float, layout: str, channels: slice) -> None:
    """Rotate ``keys[..., channels]`` in place by ``angles`` and multiply them by ``ratio``.

    keys: [batch, kv_heads, slots, head_dim]; angles: [batch or 1, slots, dim/2]
    (float32). Pairs are (i, i + dim/2) in the "half" layout and (2i, 2i + 1)
    in "interleaved" / "sin-cos" (GPT-J), pair i turning by angles[..., i].
    """
    rotated = keys[..., channels]
    dim = rotated.shape[-1]
    if layout == "half":
        first, second = rotated[..., : dim // 2], rotated[..., dim // 2 :]
    else:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [batch, 1, slots, dim/2]
    if ratio != 1.0:
        cos, sin = cos * ratio, sin * ratio
    x, y = first.float(), second.float()
    new_first = (x * cos - y * sin).to(keys.dtype)
    new_second = (y * cos + x * sin).to(keys.dtype)
    first.copy_(new_first)
    second.copy_(new_second)


def cache_argument(module: nn.Module, args: tuple, kwargs: dict):
    """The cache a model's forward was called with (``cache`` in transformers 5.25, formerly ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    if args:
        signature = getattr(module, "_rope_ntk_signature", None)
        if signature is None:
            signature = inspect.signature(module.forward)
            module._rope_ntk_signature = signature
        bound = signature.bind_partial(*args).arguments
        for name in ("cache", "past_key_values"):
            if bound.get(name) is not None:
                return bound[name]
    return None


def output_cache(output):
    if isinstance(output, tuple):  # return_dict=False
        return next((item for item in output if hasattr(item, "layers")), None)
    for name in ("cache", "past_key_values"):
        found = getattr(output, name, None)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- the model forward, split by scaling


def _call_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Every argument of a forward call as keywords, the deprecated ``past_key_values`` as ``cache``."""
    arguments: dict = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    if "cache" in signature.parameters and arguments.get("past_key_values") is not None:
        arguments["cache"] = arguments.pop("past_key_values")
    return arguments


def _cache_name(signature: inspect.Signature) -> str:
    return "cache" if "cache" in signature.parameters else "past_key_values"


def chunk_bounds(rotaries: list, position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """Split the columns of ``position_ids`` [batch, seq] into runs that share every rotary's scaling.

    Column c is computed with the scaling of length max over rows of position + 1 (the
    largest position seen so far, as when decoding token by token), rounded up to ``step``.
    Keys only grow with the column (the lengths are a running maximum), so a run ends where
    any rotary's key changes; one vectorized pass, no Python loop over the columns.
    """
    lengths = position_ids.max(dim=0).values.cummax(dim=0).values + 1  # [seq]
    seq = lengths.numel()
    first, last = int(lengths[0]), int(lengths[-1])
    if all(r.scaling_key(first) == r.scaling_key(last) for r in rotaries):
        return [(0, seq)]  # the common case: one scaling for the whole input
    change = torch.zeros(seq, dtype=torch.bool)
    for rotary in rotaries:
        keys = rotary.scaling_keys(lengths.cpu())  # [seq]
        change[1:] |= keys[1:] != keys[:-1]
    starts = [0] + (change.nonzero().flatten().tolist())
    return list(zip(starts, starts[1:] + [seq]))


def wrap_forward(parent: nn.Module, rotaries: list) -> None:
    """Make ``parent`` (the module that calls ``rotaries``) compute dynamic scaling causally.

    Every token is computed with the scaling of its own prefix length, so its
    hidden states never depend on later tokens and a KV cache stays valid:
    an input whose columns span several scalings runs as consecutive chunks
    through a DynamicCache (the caller's, or a temporary one), each chunk
    re-rotating the keys before it; one scaling runs as one call. Undone by
    ``unwrap_forward``.
    """
    original = parent.forward
    signature = inspect.signature(original)
    cache_name = _cache_name(signature)

    def run(call: dict, cache):
        for rotary in rotaries:
            rotary._cache, rotary._written = cache, None
        try:
            output = original(**call)
            created = output_cache(output)
            for rotary in rotaries:
                if rotary._cache is None and created is not None and rotary._written is not None:
                    check_cache(created)
                    positions, length = rotary._written
                    states(created).setdefault(id(rotary), Rotation(positions.detach().clone(), length))
        finally:
            for rotary in rotaries:
                rotary._cache, rotary._written = None, None
        return output

    def forward(*args, **kwargs):
        call = _call_arguments(signature, args, kwargs)
        cache = call.get(cache_name)
        if cache is not None:
            check_cache(cache)
        name = "input_ids" if call.get("input_ids") is not None else "inputs_embeds"
        inputs = call[name]
        position_ids = call.get("position_ids")
        if position_ids is None:  # as the model derives them
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs.shape[1], device=inputs.device) + past)[None]
        bounds = chunk_bounds(rotaries, position_ids)
        if len(bounds) == 1:
            return run(call, cache)
        return _chunked(parent, run, call, cache_name, name, position_ids, bounds)

    parent.forward = forward
    parent._rope_ntk_forward = forward


def unwrap_forward(parent: nn.Module) -> None:
    if getattr(parent, "_rope_ntk_forward", None) is not None:
        del parent.forward
        del parent._rope_ntk_forward


def _chunked(parent, run, call: dict, cache_name: str, name: str, position_ids, bounds):
    from transformers import DynamicCache

    for flag in ("output_attentions",):
        if call.get(flag):
            raise NotImplementedError(
                f"{flag}=True with cache_consistent=True on an input spanning {len(bounds)} dynamic scalings: "
                "the attention maps of its chunks have different widths; patch with cache_consistent=False."
            )
    mask = call.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise NotImplementedError(
            f"attention_mask of shape {tuple(mask.shape)} with cache_consistent=True on an input spanning "
            f"{len(bounds)} dynamic scalings: only 2D [batch, length] masks can be split; "
            "patch with cache_consistent=False."
        )
    cache = call.get(cache_name)
    keep = cache is not None or call.get("use_cache", getattr(parent.config, "use_cache", True)) is not False
    if cache is None:
        cache = DynamicCache(config=parent.config)
    seq = call[name].shape[1]
    past = mask.shape[1] - seq if mask is not None else 0
    outputs = []
    for start, end in bounds:
        part = dict(call)
        part[name] = call[name][:, start:end]
        part["position_ids"] = position_ids[:, start:end]
        part[cache_name], part["use_cache"] = cache, True
        if mask is not None:
            part["attention_mask"] = mask[:, : past + end]
        if call.get("cache_position") is not None:
            part["cache_position"] = call["cache_position"][start:end]
        outputs.append(run(part, cache))
    output = outputs[-1]
    output["last_hidden_state"] = torch.cat([o.last_hidden_state for o in outputs], dim=1)
    if getattr(output, "hidden_states", None) is not None:
        output["hidden_states"] = tuple(torch.cat(h, dim=1) for h in zip(*(o.hidden_states for o in outputs)))
    for field in ("cache", "past_key_values"):
        if field in output or hasattr(type(output), field):
            output[field] = cache if keep else None
    return output
