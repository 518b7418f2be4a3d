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
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import cache as kv
from . import families, formulas, methods
from .errors import InvalidParameterError, UnsupportedModelError
from .rotary import LayerTypeRotary, ScaledRotaryEmbedding, rotary_output

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
    softmax_scales: list[tuple[nn.Module, float]] = field(default_factory=list)
    # modules whose forward runs cache-consistent dynamic scaling (see cache.wrap_forward)
    wrapped: list[nn.Module] = field(default_factory=list)


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
    has_inv_freq = isinstance(getattr(module, "inv_freq", None), torch.Tensor)
    # GPT-J keeps a sin/cos table and Gemma 3 one inv_freq per layer type: known by their class name
    return has_inv_freq or type(module).__name__.endswith("RotaryEmbedding") or isinstance(module, LayerTypeRotary)


def find_rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every rotary embedding in ``model`` (outermost ones only)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if _is_rotary(module):
            found.append((name, module))
    return found


def _flat_4x(config) -> dict[str, Any]:
    """transformers 4.x ``rope_scaling`` + ``rope_theta`` as one dict, the type under ``rope_type``."""
    merged = dict(getattr(config, "rope_scaling", None) or {})
    spelled = merged.pop("type", None)  # older 4.x configs spell the type "type"
    if spelled is not None:
        merged.setdefault("rope_type", spelled)
    if getattr(config, "rope_theta", None) is not None:
        merged.setdefault("rope_theta", config.rope_theta)
    return merged


def _rope_parameters(config, layer_type: str | None = None) -> dict[str, Any]:
    """transformers 5.x ``rope_parameters``, or the same dict read from a 4.x config.

    4.x keeps ``rope_scaling`` and ``rope_theta`` apart, and per-layer-type
    families there have the unscaled layer types' base in its own attribute
    (Gemma 3's ``rope_local_base_freq``); both come back in the 5.x shape.
    """
    params = getattr(config, "rope_parameters", None)
    if not (isinstance(params, dict) and params):
        params = _flat_4x(config)
        family = families.FAMILIES.get(getattr(config, "model_type", None))
        bases = {lt: getattr(config, key, None) for lt, key in (family.base_keys_4x if family else ())}
        if bases and all(v is not None for v in bases.values()):
            nested = {lt: {"rope_type": "default", "rope_theta": base} for lt, base in bases.items()}
            for _, lt in family.modules_4x:
                nested.setdefault(lt, dict(params))
            params = nested
    if layer_type is not None:
        return params.get(layer_type) or {}
    return params


def to_4x_attributes(
    rope: dict[str, Any], family: families.Family, max_position_embeddings: int | None = None
) -> dict[str, Any]:
    """Config attributes that spell a 5.x ``rope_parameters`` dict in transformers 4.x's schema.

    Raises ``InvalidParameterError`` where 4.x cannot express it: a
    per-layer-type RoPE other than Gemma 3's scaled global layers with
    default-RoPE local layers of their own base; a rope type the family's
    4.x config refuses (OLMo: linear and dynamic only); Phi-3's longrope
    with a factor other than max_position_embeddings / original.
    """
    rope = copy.deepcopy(rope)
    attributes: dict[str, Any] = {}
    if rope and not {"rope_type", "type", "rope_theta"} & set(rope):  # one dict per layer type
        bases = dict(family.base_keys_4x)
        rest = [lt for lt in rope if lt not in bases]
        if not bases or len(rest) != 1 or not set(bases) <= set(rope):
            raise InvalidParameterError(
                f"schema='4.x' cannot express per-layer-type rope_parameters (keys {sorted(rope)}) for "
                f"{family.name}: transformers 4.x has one rope_scaling per model; use schema='5.x'."
            )
        for layer_type, key in bases.items():
            entry = rope[layer_type]
            if entry.get("rope_type", entry.get("type", "default")) != "default" or set(entry) - {
                "rope_type", "type", "rope_theta"
            }:
                raise InvalidParameterError(
                    f"schema='4.x' cannot express a scaled {layer_type!r} RoPE ({entry}) for {family.name}: "
                    f"transformers 4.x builds it as the default RoPE with base config.{key}; use schema='5.x'."
                )
            attributes[key] = entry["rope_theta"]
        rope = rope[rest[0]]
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            attributes[key] = rope.pop(key)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", "default")
    rope.pop("type", None)
    accepted = family.accepted_rope_types(transformers_4=True)
    if accepted is not None and rope_type not in accepted:
        raise InvalidParameterError(
            f"schema='4.x' cannot express rope_type {rope_type!r} for {family.name}: its transformers 4.x config "
            f"accepts only {', '.join(accepted)}; use schema='5.x'."
        )
    if rope_type == "longrope":
        # 4.x's longrope reads the original length from the top-level config attribute (else
        # max_position_embeddings) and, when that attribute is set, replaces factor by
        # max_position_embeddings / original: the attention factor is spelled out so factor is not needed
        original = rope.get("original_max_position_embeddings")
        if original is not None:
            attributes["original_max_position_embeddings"] = original
            if rope.get("attention_factor") is None and rope.get("factor") is not None:
                rope["attention_factor"] = formulas.longrope_attention_factor(rope["factor"], original)
    if rope_type == "default":
        attributes["rope_scaling"] = None
    elif family.scaling_keys_4x is not None:  # validated the old way: exactly "type" and these keys
        _check_derived_4x(rope_type, rope, family, max_position_embeddings)
        attributes["rope_scaling"] = {"type": rope_type, **{k: rope[k] for k in family.scaling_keys_4x}}
    else:  # both spellings: older 4.x releases read "type", later ones "rope_type"
        attributes["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **rope}
    for key, alias in family.aliases_4x:
        if key in attributes:
            attributes[alias] = attributes[key]
    return attributes


def _check_derived_4x(rope_type: str, rope: dict[str, Any], family: families.Family, max_positions: int | None):
    """Old-style 4.x configs drop every key but ``scaling_keys_4x``: the dropped ones must be what 4.x derives."""
    dropped = sorted(set(rope) - set(family.scaling_keys_4x) - {"original_max_position_embeddings"})
    if rope_type == "longrope" and max_positions is not None:
        # Phi-3: factor = max_position_embeddings / original, attention factor from it
        original = rope.get("original_max_position_embeddings") or max_positions
        factor = max_positions / original
        derived = {"factor": factor, "attention_factor": formulas.longrope_attention_factor(factor, original)}
        dropped = [k for k in dropped if not (k in derived and math.isclose(rope[k], derived[k], rel_tol=1e-12))]
    if dropped:
        raise InvalidParameterError(
            f"schema='4.x' cannot express {', '.join(f'{k}={rope[k]!r}' for k in dropped)} for {family.name}'s "
            f"{rope_type!r} RoPE: its transformers 4.x config holds only {', '.join(family.scaling_keys_4x)}"
            + (f" and derives factor from max_position_embeddings={max_positions}" if rope_type == "longrope" else "")
            + "; use schema='5.x'."
        )


def _layer_types(module: nn.Module) -> list[str]:
    """Layer types a per-layer-type rotary module serves (those it built a RoPE for)."""
    return sorted(getattr(module, "rope_type", {}) or {})


def _inv_freq_pairs(module: nn.Module, layer_type: str | None) -> int:
    if layer_type is not None and isinstance(getattr(module, f"{layer_type}_inv_freq", None), torch.Tensor):
        return getattr(module, f"{layer_type}_inv_freq").numel()
    if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        return module.inv_freq.numel()
    return module.embed_positions.shape[-1] // 2  # GPT-J: [positions, sin half | cos half]


def model_rope(
    model: nn.Module,
    module: nn.Module,
    family: families.Family | None = None,
    layer_type: str | None = None,
    base: dict[str, Any] | None = None,
) -> methods.ModelRope:
    """Read base, rotated width and original context for one rotary module.

    ``base`` replaces the config's RoPE parameters (the unscaled ones a
    saved patch recorded); ``layer_type`` picks one of a nested config.
    """
    family = family or families.family_of(model)
    config = getattr(module, "config", None) or model.config
    params = dict(base if base is not None else _rope_parameters(config))
    if layer_type is not None:
        params = dict(params.get(layer_type) or {})
    if family.rope_theta is not None:
        params.setdefault("rope_theta", family.rope_theta)
    where = f"{family.name} ({family.model_type})"
    if "rope_theta" not in params:
        raise UnsupportedModelError(
            f"{where}: its rotary module has no rope_theta in config.rope_parameters (keys: {sorted(params)}); "
            "add this family to rope_ntk/families.py with where its base lives."
        )
    if family.rotary_dim_key is not None:
        dim = getattr(config, family.rotary_dim_key, None)
        if not dim:
            raise UnsupportedModelError(f"{where}: config.{family.rotary_dim_key} is not set; the rotated width is unknown.")
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        dim = int(head_dim * partial)
    pairs = _inv_freq_pairs(module, layer_type)
    if dim != 2 * pairs:
        raise UnsupportedModelError(
            f"{where}: rotary module has {pairs} frequency pairs but the config implies a rotated width of {dim}; "
            "this rotary layout is not supported."
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    original = (
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or max_positions
    )
    return methods.ModelRope(float(params["rope_theta"]), int(dim), int(original), max_positions)


def _check_layout(
    model: nn.Module, name: str, original: nn.Module, replacement: ScaledRotaryEmbedding, layer_type: str | None
) -> None:
    """Refuse modules whose output differs in form from the replacement's.

    The original module runs on positions 0..15 and must return what its
    own unscaled frequencies (its ``original_inv_freq`` buffer) give in the
    family's layout; a different structure, shape or values mean the
    replacement would silently rotate the wrong channels.
    """
    device = replacement.inv_freq.device
    x = torch.zeros(1, 1, dtype=torch.float32, device=device)
    positions = torch.arange(16, device=device)[None]
    prefix = f"{layer_type}_" if layer_type else ""
    own = getattr(original, f"{prefix}original_inv_freq", None)
    own = own if isinstance(own, torch.Tensor) else getattr(original, f"{prefix}inv_freq", None)
    if isinstance(own, torch.Tensor):
        scale = float(getattr(original, f"{prefix}attention_scaling", 1.0))
        want = rotary_output(positions, own.float(), scale, replacement.layout, torch.float32)
    else:  # GPT-J: a fixed table of the default RoPE
        want = ScaledRotaryEmbedding("none", {}, replacement.rope, device=device, layout=replacement.layout)(x, positions)
    family = families.family_of(model)
    extra = () if layer_type is None else (layer_type,)
    try:
        got = original(x, positions, *extra)
    except Exception as exc:  # the module's own signature is the problem here
        raise UnsupportedModelError(
            f"{family.name}: rotary module {name!r} ({type(original).__name__}) cannot be called as "
            f"(x, position_ids{', layer_type' if extra else ''}): {exc}"
        ) from None
    same = isinstance(got, tuple) and len(got) == 2 and all(g.shape == w.shape for g, w in zip(got, want))
    if same and device.type != "meta":  # a meta-device model has shapes but no values to compare
        same = all(torch.allclose(g.float(), w, atol=2e-2) for g, w in zip(got, want))
    if not same:
        raise UnsupportedModelError(
            f"{family.name}: rotary module {name!r} ({type(original).__name__}) does not return {replacement.layout!r}-"
            "layout angles of the expected shape; patching it would rotate the wrong channels."
        )


def _config_keys(config) -> tuple[str, ...]:
    # 5.x keeps everything in rope_parameters (rope_scaling is a deprecated
    # alias there, so it is not touched); 4.x splits rope_scaling/rope_theta
    # and has per-family attributes (see families.Family.*_4x).
    keys = ("rope_parameters", CONFIG_KEY)
    if not isinstance(getattr(config, "rope_parameters", None), dict):
        family = families.FAMILIES.get(getattr(config, "model_type", None))
        keys = ("rope_scaling", "rope_theta", "partial_rotary_factor", CONFIG_KEY)
        if family is not None:
            keys += tuple(key for _, key in family.base_keys_4x + family.aliases_4x)
    if hasattr(config, "original_max_position_embeddings"):  # Phi-3 reads it over rope_parameters
        keys += ("original_max_position_embeddings",)
    return keys


def _backup_config(config) -> dict[str, Any]:
    return {k: copy.deepcopy(getattr(config, k)) for k in _config_keys(config) if hasattr(config, k)}


def _restore_config(config, backup: dict[str, Any]) -> None:
    for key in _config_keys(config):
        if key in backup:
            setattr(config, key, copy.deepcopy(backup[key]))
        elif hasattr(config, key):
            delattr(config, key)


# keys of a RoPE dict that describe the model rather than the scaling; kept when a scaling is recorded
_MODEL_KEYS = ("partial_rotary_factor", "mrope_section")


def _native_entry(spec, resolved, rope: methods.ModelRope, unscaled: dict[str, Any]) -> dict[str, Any] | None:
    native = methods.to_hf(spec, resolved, rope)
    if native is not None:
        native.update({k: unscaled[k] for k in _MODEL_KEYS if k in unscaled})
    return native


def _record_config(config, family, spec, resolved, ropes: dict[str | None, tuple[methods.ModelRope, bool]],
                   original: dict[str, Any], scaled_types: list[str] | None) -> bool:
    """Write the scaling into ``config``; return whether transformers alone can reproduce it.

    ``ropes`` maps a layer type (None for a flat config) to (model numbers,
    scaled?). The unscaled RoPE parameters always go into the rope_ntk entry,
    so a saved model can be reloaded and re-patched without stacking.
    """
    entries: dict[str | None, dict[str, Any] | None] = {}
    for layer_type, (rope, scaled) in ropes.items():
        unscaled = original.get(layer_type, {}) if layer_type is not None else original
        entries[layer_type] = _native_entry(spec, resolved, rope, unscaled) if scaled else dict(unscaled)
    accepted = family.native_rope_types
    native = family.native and all(
        entry is not None and (accepted is None or entry.get("rope_type", "default") in accepted)
        for entry in entries.values()
    )
    if native and isinstance(getattr(config, "rope_parameters", None), dict):
        if None in entries:
            config.rope_parameters = entries[None]
        else:
            config.rope_parameters = {**config.rope_parameters, **entries}
        if hasattr(config, "original_max_position_embeddings") and None in entries:
            config.original_max_position_embeddings = entries[None].get(
                "original_max_position_embeddings", config.original_max_position_embeddings
            )
    elif native:  # transformers 4.x schema
        try:
            attributes = to_4x_attributes(
                entries[None] if None in entries else entries, family, getattr(config, "max_position_embeddings", None)
            )
        except InvalidParameterError:  # e.g. Gemma 3 with its local layers scaled: 4.x cannot say it
            native = False
        else:
            for key, value in attributes.items():
                setattr(config, key, value)
    else:
        native = False
    setattr(config, CONFIG_KEY, {
        "method": spec.name,
        "params": dict(resolved),
        "layer_types": scaled_types,
        "native": native,
        "original": copy.deepcopy(original),
    })
    return native


def _recorded_original(model: nn.Module) -> dict[str, Any] | None:
    """Unscaled RoPE parameters a saved patch left in the config, if any."""
    entry = getattr(model.config, CONFIG_KEY, None)
    if isinstance(entry, dict) and isinstance(entry.get("original"), dict):
        return entry["original"]
    return None


def _unscaled_rope_parameters(model: nn.Module, state: "_PatchState | None") -> dict[str, Any]:
    """The RoPE parameters a new patch starts from: never those of an earlier patch."""
    if state is None:
        recorded = _recorded_original(model)
        return copy.deepcopy(recorded if recorded is not None else _rope_parameters(model.config))
    backup = state.config_backup
    if isinstance((backup.get(CONFIG_KEY) or {}).get("original"), dict):
        return copy.deepcopy(backup[CONFIG_KEY]["original"])
    # the config as it was before the patch, read like a live one (either schema)
    before = types.SimpleNamespace(model_type=getattr(model.config, "model_type", None), **backup)
    return copy.deepcopy(_rope_parameters(before))


def _softmax_scales(model, family, spec, resolved) -> list[tuple[nn.Module, float]]:
    """(attention module, new softmax scale) for families whose attention reads YaRN's mscale_all_dim."""
    if family.softmax_mscale_dim_key is None:
        return []
    mscale_all_dim = resolved.get("mscale_all_dim") or 0.0
    if mscale_all_dim and spec.dynamic:
        raise InvalidParameterError(
            f"mscale_all_dim={mscale_all_dim!r} for method {spec.name!r} on {family.name}: its softmax scale would "
            "have to follow the length; use the static 'yarn' method with mscale_all_dim."
        )
    scale = getattr(model.config, family.softmax_mscale_dim_key) ** -0.5
    if mscale_all_dim and resolved.get("factor"):
        scale *= formulas.yarn_mscale(resolved["factor"], mscale_all_dim) ** 2
    return [(m, scale) for m in model.modules() if "Attention" in type(m).__name__ and hasattr(m, "scaling")]


def _scaled_layer_types(layer_types, family: families.Family, served: list[str]) -> list[str]:
    """Layer types a patch scales: the user's, else the family's default, else all served."""
    scaled = list(layer_types or family.scaled_layer_types or served)
    unknown = sorted(set(scaled) - set(served))
    if unknown:
        raise InvalidParameterError(
            f"layer_types={layer_types!r} names {unknown}, which {family.name} does not have; "
            f"valid: {', '.join(served)}."
        )
    return scaled


def _layer_type_rotary(
    model, layer_type: str, spec, resolved, rope, scaled: bool, device, family: families.Family, consistent
) -> ScaledRotaryEmbedding:
    """The replacement RoPE of one layer type: the method if scaled, else unscaled."""
    return ScaledRotaryEmbedding(
        spec.name if scaled else "none", resolved if scaled else {}, rope, device, family.layout,
        consistent, _layer_indices(model, layer_type),
    )


def _layer_indices(model: nn.Module, layer_type: str) -> list[int]:
    """Decoder layers (cache layers) of ``layer_type``, from ``config.layer_types``."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == layer_type]


def _resolve_cache_consistent(value: Any, spec: methods.Method, family: families.Family) -> bool:
    if value is not None and not isinstance(value, bool):
        raise InvalidParameterError(
            f"cache_consistent={value!r} must be True, False or None (None: on for dynamic methods)."
        )
    if family.no_cache_rotation and spec.dynamic:
        if value:
            raise NotImplementedError(
                f"cache_consistent=True for {spec.name!r} on {family.name}: {family.no_cache_rotation}; "
                "patch with cache_consistent=False (the legacy behaviour)."
            )
        logger.info("%s: cache_consistent is off for %s: %s", family.name, spec.name, family.no_cache_rotation)
        return False
    return spec.dynamic if value is None else value


def patch(
    model: nn.Module,
    method: str,
    *,
    layer_types: list[str] | None = None,
    cache_consistent: bool | None = None,
    **params: Any,
) -> PatchHandle:
    """Replace the rotary embeddings of ``model`` with ``method``'s.

    ``params`` are the method's parameters (see ``rope_ntk.METHODS``), e.g.
    ``patch(model, "yarn", factor=4)``. ``layer_types`` picks which layer
    types a per-layer-type family scales (default: its row in
    ``rope_ntk.families``, e.g. Gemma 3's global layers). Returns a handle
    that is also a context manager. Raises ``InvalidParameterError`` for bad
    methods or parameters and ``UnsupportedModelError`` for models whose
    rotary embedding rope_ntk cannot replace, before anything is changed.

    ``cache_consistent`` (dynamic methods: ``dynamic-ntk``, ``dynamic-yarn``,
    ``longrope``; default on): when the scaling changes between forward
    calls sharing a KV cache, re-rotate the cached keys so cached decoding
    equals a full forward (see ``rope_ntk/cache.py``). False keeps the
    legacy behaviour of transformers: cached keys keep the rotation of the
    length at which they were written.
    """
    spec = methods.get_method(method)
    resolved = methods.validate_params(spec, params)
    family = families.family_of(model)
    consistent = _resolve_cache_consistent(cache_consistent, spec, family)
    if family.unsupported:
        raise UnsupportedModelError(f"{family.name} ({family.model_type}) is not supported: {family.unsupported}")
    found = [(n, m) for n, m in find_rotary_modules(model) if not isinstance(m, LayerTypeRotary)]
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is not None:  # patch the original modules again, never the replacements
        found = [(slot.name, slot.original) for slot in state.slots]
    if not found:
        raise UnsupportedModelError(
            f"{family.name} ({family.model_type}): {type(model).__name__} has no rotary embedding module (no "
            "submodule with an inv_freq buffer or a *RotaryEmbedding class); rope_ntk patches models whose RoPE "
            "lives in such a module, such as Llama, Mistral and Qwen2."
        )
    original = _unscaled_rope_parameters(model, state)
    base = original

    named = dict(model.named_modules())
    slots, replacements = [], []
    ropes: dict[str | None, tuple[methods.ModelRope, bool]] = {}
    scaled_types = None
    # transformers 4.x builds per-layer-type families with one module per layer type
    split = dict(family.modules_4x)
    split_served = [lt for attr, lt in family.modules_4x if any(n.rpartition(".")[2] == attr for n, _ in found)]
    for name, module in found:
        device = next(module.buffers()).device
        if family.per_layer_type and not isinstance(getattr(module, "rope_type", None), dict):
            layer_type = split.get(name.rpartition(".")[2])
            if layer_type is None:
                raise UnsupportedModelError(
                    f"{family.name}: rotary module {name!r} ({type(module).__name__}) serves none of the layer types "
                    f"rope_ntk knows for this family ({', '.join(f'{a} -> {t}' for a, t in split.items()) or 'none'})."
                )
            scaled_types = _scaled_layer_types(layer_types, family, split_served)
            rope = model_rope(model, module, family, layer_type, base)
            scaled = layer_type in scaled_types
            new = _layer_type_rotary(model, layer_type, spec, resolved, rope, scaled, device, family, consistent)
            _check_layout(model, name, module, new, None)
            ropes[layer_type] = (rope, scaled)
        elif family.per_layer_type:
            served = _layer_types(module)
            scaled_types = _scaled_layer_types(layer_types, family, served)
            by_type = {}
            for layer_type in served:
                rope = model_rope(model, module, family, layer_type, base)
                scaled = layer_type in scaled_types
                by_type[layer_type] = _layer_type_rotary(
                    model, layer_type, spec, resolved, rope, scaled, device, family, consistent
                )
                _check_layout(model, name, module, by_type[layer_type], layer_type)
                ropes[layer_type] = (rope, scaled)
            new: nn.Module = LayerTypeRotary(by_type)
        else:
            if layer_types is not None:
                raise InvalidParameterError(
                    f"layer_types={layer_types!r} was given but {family.name} has one RoPE for every layer; "
                    "leave layer_types out."
                )
            rope = model_rope(model, module, family, None, base)
            new = ScaledRotaryEmbedding(
                spec.name, resolved, rope, device=device, layout=family.layout, cache_consistent=consistent
            )
            _check_layout(model, name, module, new, None)
            ropes.setdefault(None, (rope, True))
        parent_name, _, attr = name.rpartition(".")
        slots.append(_Slot(named[parent_name] if parent_name else model, attr, name, module))
        replacements.append(new)
    softmax = _softmax_scales(model, family, spec, resolved)

    # nothing has changed up to here; from here on nothing can fail
    if state is not None:
        unpatch(model)
    config_backup = _backup_config(model.config)
    for slot, new in zip(slots, replacements):
        setattr(slot.parent, slot.attr, new)
    scales_backup = [(m, m.scaling) for m, _ in softmax]
    for m, scale in softmax:
        m.scaling = scale
    _record_config(model.config, family, spec, resolved, ropes, original, scaled_types)
    wrapped = []
    for slot, new in zip(slots, replacements):
        rotaries = [m for m in new.modules() if isinstance(m, ScaledRotaryEmbedding) and m.cache_consistent]
        if rotaries:
            kv.wrap_forward(slot.parent, rotaries)
            wrapped.append(slot.parent)
    setattr(model, _STATE_ATTR, _PatchState(slots, config_backup, scales_backup, wrapped))
    logger.info("patched %d rotary module(s) of %s with %s %s", len(slots), type(model).__name__, spec.name, resolved)
    return PatchHandle(model, spec.name, resolved, [s.name for s in slots])


def unpatch(model: nn.Module) -> None:
    """Put the original rotary modules, softmax scales and config back (no-op if unpatched)."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    for slot in state.slots:
        setattr(slot.parent, slot.attr, slot.original)
    for module, scale in state.softmax_scales:
        module.scaling = scale
    for parent in state.wrapped:
        kv.unwrap_forward(parent)
    _restore_config(model.config, state.config_backup)
    delattr(model, _STATE_ATTR)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per rotary module (per layer type where it keeps several):
    its name, class, method, parameters and attention factor."""
    entries = []
    split = dict(families.family_of(model).modules_4x)
    for name, module in find_rotary_modules(model):
        # a transformers 4.x module that serves one layer type (Gemma 3's rotary_emb_local)
        one_type = not isinstance(module, LayerTypeRotary) and not isinstance(getattr(module, "rope_type", None), dict)
        split_type = split.get(name.rpartition(".")[2]) if one_type else None
        if isinstance(module, LayerTypeRotary):
            for layer_type, sub in module.by_type.items():
                entries.append({"module": name, "layer_type": layer_type, "class": type(sub).__name__, **sub.describe()})
            continue
        if isinstance(module, ScaledRotaryEmbedding):
            entry = {"module": name, "class": type(module).__name__}
            if split_type is not None:
                entry["layer_type"] = split_type
            entries.append({**entry, **module.describe()})
            continue
        config = getattr(module, "config", None) or model.config
        served = _layer_types(module) if isinstance(getattr(module, "rope_type", None), dict) else [split_type]
        for layer_type in served:
            params = _rope_parameters(config, layer_type)
            rope_type = params.get("rope_type", "default")
            entry: dict[str, Any] = {"module": name, "class": type(module).__name__}
            if layer_type is not None:
                entry["layer_type"] = layer_type
            entry["method"] = "none" if rope_type == "default" else f"transformers:{rope_type}"
            entry["params"] = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
            entry["rope_theta"] = params.get("rope_theta", families.family_of(model).rope_theta)
            suffix = f"{layer_type}_" if layer_type and split_type is None else ""
            entry["attention_factor"] = float(getattr(module, f"{suffix}attention_scaling", 1.0))
            entries.append(entry)
    return entries


def apply_recorded(model: nn.Module) -> PatchHandle | None:
    """Re-apply the patch a saved config recorded (``config.rope_ntk``); None if there is none.

    Needed for methods transformers cannot express (``dynamic-yarn``, GPT-J);
    harmless for native ones, which then run in rope_ntk's module.
    """
    entry = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or is_patched(model):
        return None
    if not isinstance(entry.get("method"), str) or not isinstance(entry.get("params"), dict):
        raise InvalidParameterError(
            f"config.{CONFIG_KEY}={entry!r} is not a rope_ntk record; it needs 'method' (a string) and "
            "'params' (a dict)."
        )
    return patch(model, entry["method"], layer_types=entry.get("layer_types"), **entry["params"])


def patch_from_hf(
    model: nn.Module, rope: dict[str, Any], argument: str = "rope_parameters", cache_consistent: bool | None = None
) -> PatchHandle:
    """Patch ``model`` with the scaling a transformers RoPE dict describes (5.x or 4.x schema).

    transformers' ``dynamic`` measures length against ``max_position_embeddings``,
    so that is the original length unless the dict names one. ``cache_consistent``
    as in ``patch`` (False: transformers' own behaviour for dynamic types).
    """
    method, params = methods.from_hf(rope, argument)
    if method.name == "dynamic-ntk" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = model.config.max_position_embeddings
    return patch(model, method.name, cache_consistent=cache_consistent, **params)
