"""Find the rotary modules of a Hugging Face model, swap them, restore them.

``patch`` replaces every rotary module the model calls in forward with a
``ScaledRotaryEmbedding`` and records the scaling in ``model.config``;
``unpatch`` puts the very same original module objects and config back, so
the model is restored bit for bit. Patching a patched model first restores
it, so patches never stack.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import methods
from .errors import UnsupportedModelError
from .rotary import ScaledRotaryEmbedding

logger = logging.getLogger(__name__)

_STATE_ATTR = "_rope_ntk_patch"
# config attribute where rope_ntk records what it applied (saved with the config)
CONFIG_KEY = "rope_ntk"


@dataclass
class _Slot:
    parent: nn.Module
    attr: str
    name: str
    original: nn.Module


@dataclass
class _PatchState:
    slots: list[_Slot]
    config_backup: dict[str, Any]


@dataclass
class PatchHandle:
    """What ``patch`` returns; also a context manager that unpatches on exit."""

    model: nn.Module
    method: str
    params: dict[str, Any]
    modules: list[str] = field(default_factory=list)

    def unpatch(self) -> None:
        unpatch(self.model)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        unpatch(self.model)


def _is_rotary(module: nn.Module) -> bool:
    return isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "forward")


def find_rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every rotary embedding in ``model``."""
    return [(name, m) for name, m in model.named_modules() if _is_rotary(m)]


def _rope_parameters(config) -> dict[str, Any]:
    """transformers 5.x ``rope_parameters`` or 4.x ``rope_scaling`` + ``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    merged = dict(getattr(config, "rope_scaling", None) or {})
    if getattr(config, "rope_theta", None) is not None:
        merged.setdefault("rope_theta", config.rope_theta)
    return merged


def model_rope(model: nn.Module, module: nn.Module) -> methods.ModelRope:
    """Read base, rotated width and original context for one rotary module."""
    config = getattr(module, "config", None) or model.config
    params = _rope_parameters(config)
    family = type(model).__name__
    if "rope_theta" not in params:
        raise UnsupportedModelError(
            f"{family}: its rotary module has no rope_theta in config.rope_parameters "
            f"(keys: {sorted(params)}); per-layer-type RoPE configs are not supported yet."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    dim = int(head_dim * partial)
    pairs = module.inv_freq.numel()
    if dim != 2 * pairs:
        raise UnsupportedModelError(
            f"{family}: rotary module has {pairs} frequency pairs but the config implies a rotated width of {dim}; "
            "this rotary layout is not supported."
        )
    original = (
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )
    return methods.ModelRope(float(params["rope_theta"]), dim, int(original))


def _check_layout(model: nn.Module, name: str, original: nn.Module, rope: methods.ModelRope) -> None:
    """Refuse modules whose (cos, sin) layout differs from rotate-half.

    The original module and an unscaled replacement are run on positions
    0..15; a different shape or values (e.g. an interleaved layout) mean the
    replacement would silently rotate the wrong channels.
    """
    device = original.inv_freq.device
    x = torch.zeros(1, 1, dtype=torch.float32, device=device)
    positions = torch.arange(16, device=device)[None]
    reference = ScaledRotaryEmbedding("none", {}, rope, device=device)
    family = type(model).__name__
    try:
        got = original(x, positions)
    except Exception as exc:  # the module's own signature is the problem here
        raise UnsupportedModelError(
            f"{family}: rotary module {name!r} ({type(original).__name__}) cannot be called as (x, position_ids): "
            f"{exc}"
        ) from None
    want = reference(x, positions)
    same = (
        isinstance(got, tuple)
        and len(got) == 2
        and all(g.shape == w.shape for g, w in zip(got, want))
    )
    rope_type = _rope_parameters(getattr(original, "config", None) or model.config).get("rope_type", "default")
    if same and rope_type == "default":
        same = all(torch.allclose(g.float(), w.float(), atol=2e-2) for g, w in zip(got, want))
    if not same:
        raise UnsupportedModelError(
            f"{family}: rotary module {name!r} ({type(original).__name__}) does not return rotate-half (cos, sin) "
            "of shape [batch, seq, dim]; patching it would rotate the wrong channels."
        )


def _native_rope_parameters(method: methods.Method, params: dict[str, Any], rope: methods.ModelRope) -> dict[str, Any]:
    """The scaling as transformers would spell it in ``rope_parameters``."""
    recorded: dict[str, Any] = {"rope_type": method.hf_rope_type or "default", "rope_theta": rope.rope_theta}
    if method.name == "ntk":
        # static NTK is exactly the default RoPE with a larger base
        from .formulas import ntk_base

        recorded["rope_theta"] = ntk_base(rope.rope_theta, rope.dim, params["alpha"])
        return recorded
    for key, value in params.items():
        if key != "alpha":
            recorded[key] = value
    if method.name == "yarn":
        recorded.setdefault("original_max_position_embeddings", rope.original_max_position_embeddings)
    return recorded


def _config_keys(config) -> tuple[str, ...]:
    # 5.x keeps everything in rope_parameters (rope_scaling is a deprecated
    # alias there, so it is not touched); 4.x splits rope_scaling/rope_theta.
    if isinstance(getattr(config, "rope_parameters", None), dict):
        return ("rope_parameters", CONFIG_KEY)
    return ("rope_scaling", "rope_theta", CONFIG_KEY)


def _backup_config(config) -> dict[str, Any]:
    return {k: copy.deepcopy(getattr(config, k)) for k in _config_keys(config) if hasattr(config, k)}


def _restore_config(config, backup: dict[str, Any]) -> None:
    for key in _config_keys(config):
        if key in backup:
            setattr(config, key, copy.deepcopy(backup[key]))
        elif hasattr(config, key):
            delattr(config, key)


def _record_config(config, method: methods.Method, params: dict[str, Any], rope: methods.ModelRope) -> None:
    native = _native_rope_parameters(method, params, rope)
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters = native
    else:  # transformers 4.x schema
        config.rope_theta = native.pop("rope_theta")
        native["type"] = native.pop("rope_type")
        config.rope_scaling = None if native["type"] == "default" else native
    setattr(config, CONFIG_KEY, {"method": method.name, "params": dict(params)})


def patch(model: nn.Module, method: str, **params: Any) -> PatchHandle:
    """Replace the rotary embeddings of ``model`` with ``method``'s.

    ``params`` are the method's parameters (see ``rope_ntk.METHODS``), e.g.
    ``patch(model, "yarn", factor=4)``. Returns a handle that is also a
    context manager. Raises ``InvalidParameterError`` for bad methods or
    parameters and ``UnsupportedModelError`` for models without a
    rotate-half rotary embedding, before anything is changed.
    """
    spec = methods.get_method(method)
    resolved = methods.validate_params(spec, params)
    if getattr(model, _STATE_ATTR, None) is not None:
        unpatch(model)

    found = find_rotary_modules(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding module (no submodule with an inv_freq buffer); "
            "rope_ntk patches models that use RoPE, such as Llama, Mistral and Qwen2."
        )
    named = dict(model.named_modules())
    slots, replacements = [], []
    for name, original in found:
        rope = model_rope(model, original)
        _check_layout(model, name, original, rope)
        parent_name, _, attr = name.rpartition(".")
        slots.append(_Slot(named[parent_name] if parent_name else model, attr, name, original))
        replacements.append(ScaledRotaryEmbedding(spec.name, resolved, rope, device=original.inv_freq.device))

    config_backup = _backup_config(model.config)
    for slot, new in zip(slots, replacements):
        setattr(slot.parent, slot.attr, new)
    _record_config(model.config, spec, resolved, replacements[0].rope)
    setattr(model, _STATE_ATTR, _PatchState(slots, config_backup))
    logger.info("patched %d rotary module(s) of %s with %s %s", len(slots), type(model).__name__, spec.name, resolved)
    return PatchHandle(model, spec.name, resolved, [s.name for s in slots])


def unpatch(model: nn.Module) -> None:
    """Put the original rotary modules and config back (no-op if unpatched)."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    for slot in state.slots:
        setattr(slot.parent, slot.attr, slot.original)
    _restore_config(model.config, state.config_backup)
    delattr(model, _STATE_ATTR)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per rotary module: its name, class, method and parameters."""
    entries = []
    for name, module in find_rotary_modules(model):
        entry: dict[str, Any] = {"module": name, "class": type(module).__name__}
        if isinstance(module, ScaledRotaryEmbedding):
            entry.update(module.describe())
        else:
            params = _rope_parameters(getattr(module, "config", None) or model.config)
            rope_type = params.get("rope_type", "default")
            entry["method"] = "none" if rope_type == "default" else f"transformers:{rope_type}"
            entry["params"] = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
            entry["rope_theta"] = params.get("rope_theta")
            entry["attention_factor"] = float(getattr(module, "attention_scaling", 1.0))
        entries.append(entry)
    return entries
