"""Check that the RoPE a model runs is the RoPE its config records.

``verify(model)`` runs one short forward pass with hooks on every rotary
module, so it sees the modules the model really calls, and compares each
with what the config says:

* the expected frequencies and attention factor are computed from the
  config alone, in float64, by the registry's formula: the method and
  parameters of ``config.rope_ntk`` (written by ``patch``, saved with the
  model) or else transformers' ``rope_parameters`` / ``rope_scaling``;
  the base and rotated width from the unscaled RoPE parameters;
* the running side is the module's float32 frequency buffer and attention
  factor, and the (cos, sin) it returned in the forward pass;
* a dynamic method is also probed past its original length (the module is
  called directly at position 2L - 1), where it differs from the default.

It returns a ``VerifyReport``; with ``strict=True`` (default) a mismatch
raises ``RopeMismatchError`` naming the module and what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import families, methods
from .errors import InvalidParameterError, RopeMismatchError, UnsupportedModelError
from .rotary import LayerTypeRotary, ScaledRotaryEmbedding, rotary_output

# float32 keeps 24 significant bits: a buffer computed from the same float64 value
# differs by at most one rounding; this leaves room for a pow() computed in float32
INV_FREQ_RTOL = 1e-6
ATTENTION_RTOL = 1e-6


@dataclass
class ModuleCheck:
    """One rotary module (one layer type of it, where it keeps several)."""

    module: str
    layer_type: str | None
    method: str
    params: dict[str, Any]
    called: bool
    inv_freq_error: float | None  # largest relative error of the frequency buffer (None: no buffer)
    attention_factor: float | None
    expected_attention_factor: float
    output_error: float | None  # largest |cos/sin - expected| of the forward pass and probe
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    """What ``verify`` found, one entry per rotary module (and layer type)."""

    checks: list[ModuleCheck]
    source: str  # "config.rope_ntk" or "config.rope_parameters"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [p for c in self.checks for p in c.problems]

    def __str__(self) -> str:
        lines = [f"RoPE verified against {self.source}: {'ok' if self.ok else 'MISMATCH'}"]
        for c in self.checks:
            where = c.module + (f"[{c.layer_type}]" if c.layer_type else "")
            state = "ok" if c.ok else "; ".join(c.problems)
            lines.append(f"  {where}: {c.method} {c.params} attention_factor={c.expected_attention_factor:.6g}: {state}")
        return "\n".join(lines)


def _expected_methods(model: nn.Module) -> tuple[str, dict[str | None, tuple[str, dict[str, Any]]], dict | None]:
    """(source, layer type -> (method, params), unscaled RoPE parameters or None) from the config alone."""
    from .patching import CONFIG_KEY, _rope_parameters

    family = families.family_of(model)
    record = getattr(model.config, CONFIG_KEY, None)
    if isinstance(record, dict) and isinstance(record.get("method"), str):
        method = methods.get_method(record["method"])
        params = methods.validate_params(method, dict(record.get("params") or {}))
        original = record.get("original") if isinstance(record.get("original"), dict) else None
        scaled = record.get("layer_types")
        if family.per_layer_type and original:
            return f"config.{CONFIG_KEY}", {
                lt: (method.name, params) if (scaled is None or lt in scaled) else ("none", {})
                for lt in original
            }, original
        return f"config.{CONFIG_KEY}", {None: (method.name, params)}, original
    rope = _rope_parameters(model.config)
    nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
    entries = nested if nested and len(nested) == len(rope) else {None: rope}
    expected = {}
    for layer_type, entry in entries.items():
        method, params = methods.from_hf(entry, "config.rope_parameters")
        if method.name == "dynamic-ntk" and "original_max_position_embeddings" not in params:
            params["original_max_position_embeddings"] = model.config.max_position_embeddings
        expected[layer_type] = (method.name, params)
    return "config.rope_parameters", expected, None


def _targets(model: nn.Module) -> list[tuple[str, nn.Module, str | None, nn.Module]]:
    """(name, module to hook, layer type, module whose numbers to read) of every rotary module."""
    from .patching import _layer_types, find_rotary_modules

    family = families.family_of(model)
    split = dict(family.modules_4x)
    found = []
    for name, module in find_rotary_modules(model):
        if isinstance(module, LayerTypeRotary):
            found += [(f"{name}.by_type.{lt}", sub, lt, module) for lt, sub in module.by_type.items()]
        elif isinstance(getattr(module, "rope_type", None), dict):  # transformers' per-layer-type module
            found += [(name, module, lt, module) for lt in _layer_types(module)]
        else:
            found.append((name, module, split.get(name.rpartition(".")[2]), module))
    return found


def _running(module: nn.Module, layer_type: str | None, seq_len: int, split: bool):
    """(float32 inv_freq or None, attention factor) a module uses at ``seq_len``."""
    if isinstance(module, ScaledRotaryEmbedding):
        inv_freq, scale = module.frequencies_for(module.stepped(seq_len) if module.method.dynamic else seq_len)
        return inv_freq, float(scale)
    prefix = f"{layer_type}_" if layer_type and not split else ""
    inv_freq = getattr(module, f"{prefix}inv_freq", None)
    scale = float(getattr(module, f"{prefix}attention_scaling", 1.0))
    return (inv_freq if isinstance(inv_freq, torch.Tensor) else None), scale


def _relative_error(have: torch.Tensor, want: torch.Tensor) -> float:
    if have.shape != want.shape:
        return math.inf
    have, want = have.detach().double().cpu(), want.double().cpu()
    if not torch.isfinite(have).all():
        return math.inf
    return float(((have - want).abs() / want.abs()).max())


def _probe(module: nn.Module, layer_type: str | None, positions: torch.Tensor, per_type: bool):
    """Call a rotary module on ``positions`` [1, n] outside the model."""
    device = next(iter(module.buffers()), torch.empty(0)).device
    x = torch.zeros(1, 1, dtype=torch.float32, device=device)
    extra = (layer_type,) if per_type else ()
    with torch.no_grad():
        return module(x, positions.to(device), *extra)


def verify(model: nn.Module, *, strict: bool = True, tokens: int = 16) -> VerifyReport:
    """Compare the rotary modules ``model`` calls in forward with its config.

    Runs one forward pass of the decoder (``tokens`` tokens, no cache, no LM head) with hooks on the
    rotary modules; see the module docstring for what is compared. Raises
    ``RopeMismatchError`` on a mismatch when ``strict``, else returns the
    report with the problems listed. ``UnsupportedModelError`` if the model
    has no rotary module, ``InvalidParameterError`` if the config's RoPE is
    not valid.
    """
    from .patching import _STATE_ATTR, model_rope

    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise InvalidParameterError(f"tokens={tokens!r} must be an integer >= 2 (length of the test forward pass).")
    family = families.family_of(model)
    source, expected, base = _expected_methods(model)
    targets = _targets(model)
    if not targets:
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module to verify.")

    outputs: dict[int, list[tuple[torch.Tensor, Any]]] = {}

    def hook(module, args, kwargs, output):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        outputs.setdefault(id(module), []).append((positions, layer_type, output))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in {id(t[1]): t[1] for t in targets}.values()]
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        device = model.get_input_embeddings().weight.device
        ids = (torch.arange(tokens, device=device) % vocab)[None]
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None) or model  # no LM head needed
        with torch.no_grad():
            decoder(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    checks = []
    patched = getattr(model, _STATE_ATTR, None) is not None
    for name, module, layer_type, owner in targets:
        method, params = expected.get(layer_type, expected.get(None, ("none", {})))
        problems: list[str] = []
        where = f"rotary module {name!r}" + (f" (layer type {layer_type!r})" if layer_type else "")
        rope = model_rope(model, _unwrap(owner, layer_type), family, layer_type, base)
        spec = methods.get_method(method)
        want = methods.frequencies(spec, params, rope, tokens)
        split = owner is module and layer_type is not None and not isinstance(getattr(module, "rope_type", None), dict)
        have_inv, have_scale = _running(module, layer_type, tokens, split or isinstance(owner, LayerTypeRotary))
        inv_error = None
        if have_inv is not None:
            inv_error = _relative_error(have_inv, want.inv_freq)
            if not inv_error <= INV_FREQ_RTOL:
                problems.append(
                    f"{where}: inv_freq differs from {method} {params} computed from {source} "
                    f"(largest relative error {inv_error:.3g}, allowed {INV_FREQ_RTOL:g})"
                )
        if not math.isclose(have_scale, want.attention_factor, rel_tol=ATTENTION_RTOL):
            problems.append(
                f"{where}: attention factor {have_scale!r} but {source} gives {want.attention_factor!r} ({method})"
            )
        if patched and not isinstance(module, ScaledRotaryEmbedding):
            problems.append(f"{where}: the model is patched but this module is the original {type(module).__name__}")
        per_type = isinstance(getattr(module, "rope_type", None), dict)
        calls = [(p, o) for p, lt, o in outputs.get(id(module), []) if not per_type or lt == layer_type]
        runs = [(o, p, want) for p, o in calls]
        if spec.dynamic:  # past the original length, where a dynamic method departs from the default
            long = 2 * int(params.get("original_max_position_embeddings") or rope.original_max_position_embeddings)
            positions = torch.tensor([[0, 1, long // 2, long - 1]])
            far = methods.frequencies(spec, params, rope, long)
            runs.append((_probe(module, layer_type, positions, per_type), positions, far))
            if not isinstance(module, ScaledRotaryEmbedding):  # transformers' dynamic modules keep state: reset it
                _probe(module, layer_type, torch.arange(tokens)[None], per_type)
        if not calls:
            problems.append(f"{where} was not called in a forward pass")
        output_error, within = 0.0, True
        for output, positions, freqs in runs:
            error, fits = _output_error(output, positions, freqs, family.layout)
            output_error, within = max(output_error, error), within and fits
        if not within:
            problems.append(
                f"{where}: its (cos, sin) differ from {method} {params} computed from {source} by up to "
                f"{output_error:.3g}, more than float rounding"
            )
        checks.append(ModuleCheck(
            name, layer_type, method, dict(params), bool(calls), inv_error, have_scale, want.attention_factor,
            output_error, problems,
        ))
    report = VerifyReport(checks, source)
    if strict and not report.ok:
        raise RopeMismatchError("RoPE mismatch: " + "; ".join(report.problems) + ".")
    return report


def _unwrap(owner: nn.Module, layer_type: str | None) -> nn.Module:
    """The module ``model_rope`` reads the pair count from."""
    if isinstance(owner, LayerTypeRotary):
        return owner.by_type[layer_type]
    return owner


def _output_error(output, positions, want, layout: str) -> tuple[float, bool]:
    """(largest |returned - expected|, within rounding?) of a rotary module's two outputs.

    The tolerance of each element is the rounding of the output's dtype
    plus the angle (position x frequency) times ``INV_FREQ_RTOL``: a
    frequency off by that much moves the angle by that much.
    """
    if not (isinstance(output, tuple) and len(output) == 2 and positions is not None):
        return math.inf, False
    inv_freq = want.inv_freq.to(torch.float32)
    expected = rotary_output(positions.cpu(), inv_freq, want.attention_factor, layout, torch.float32)
    # |angle| of each element: [batch, seq, dim/2] -> the layout's [batch, seq, dim] (sin-cos: dim/2)
    freqs = positions.cpu()[..., None].double() * want.inv_freq.double()
    if layout == "half":
        freqs = torch.cat((freqs, freqs), dim=-1)
    elif layout == "interleaved":
        freqs = freqs.repeat_interleave(2, dim=-1)
    error, within = 0.0, True
    for got, wanted in zip(output, expected):
        if got.shape[-1] != wanted.shape[-1]:
            return math.inf, False
        got = got.detach().float().cpu()
        eps = torch.finfo(output[0].dtype).eps  # a bfloat16 output keeps 8 significant bits
        tolerance = eps * wanted.abs() + (freqs.abs() * 2 * INV_FREQ_RTOL + 1e-6) * abs(want.attention_factor)
        diff = (got - wanted.expand_as(got)).abs()
        error = max(error, float(diff.max()))
        within = within and bool((diff <= tolerance.expand_as(got).to(diff.dtype)).all())
    return error, within
