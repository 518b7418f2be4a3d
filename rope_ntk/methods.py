"""The one registry of RoPE methods: name -> formula, parameters, validation.

The Python API (``patch``), the command line and the results records all
read this table, so a method or parameter added here is available everywhere.

Parameters split in two kinds:

* *model numbers* (``rope_theta``, ``dim``, ``original_max_position_embeddings``)
  are read from the model being patched; ``original_max_position_embeddings``
  may be overridden by the user;
* *method parameters* (``factor``, ``alpha``, ``beta_fast`` ...) come from the
  user and are validated here, all problems collected and raised at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import formulas
from .errors import InvalidParameterError


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a method."""

    name: str
    doc: str
    default: Any = None
    required: bool = False
    kind: str = "float"  # "float" | "int" | "bool" | "floats" (a list of numbers)
    minimum: float | None = None  # inclusive lower bound, for numbers
    above: float | None = None  # exclusive lower bound, for numbers


@dataclass(frozen=True)
class ModelRope:
    """The numbers a rotary module was built from (read off the model)."""

    rope_theta: float
    dim: int
    original_max_position_embeddings: int
    # the config's max_position_embeddings (longrope's default factor, and the
    # length transformers' ``dynamic`` measures against); None if unknown
    max_position_embeddings: int | None = None


Compute = Callable[[dict[str, Any], ModelRope, int, int], formulas.RopeFrequencies]


@dataclass(frozen=True)
class Method:
    """A RoPE scaling method as the registry knows it."""

    name: str
    paper: str
    params: tuple[Param, ...]
    # (validated params, model numbers, original length, current length) -> frequencies
    compute: Compute
    dynamic: bool = False
    # transformers' ``rope_type`` that can compute the same thing, if any
    hf_rope_type: str | None = None
    aliases: tuple[str, ...] = field(default=())
    # problems between parameters: (validated params, method name) -> full sentences
    check: Callable[[dict[str, Any], str], list[str]] | None = None
    # problems between parameters and the model (params, model numbers -> messages)
    check_model: Callable[[dict[str, Any], ModelRope], list[str]] | None = None
    # transformers' ``rope_parameters`` for (params, model numbers), None if no native equivalent
    to_hf: Callable[[dict[str, Any], ModelRope], dict[str, Any] | None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _original(p: dict[str, Any], rope: ModelRope) -> int:
    return int(p.get("original_max_position_embeddings") or rope.original_max_position_embeddings)


# ---------------------------------------------------------------- compute: params -> formulas


def _yarn(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    return formulas.yarn(
        rope.rope_theta, rope.dim, p["factor"], original, p["beta_fast"], p["beta_slow"],
        p.get("attention_factor"), p["truncate"], p.get("mscale") or 1.0, p.get("mscale_all_dim") or 0.0,
    )


def _ntk_by_parts(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    return formulas.ntk_by_parts(
        rope.rope_theta, rope.dim, p["factor"], original, p["beta_fast"], p["beta_slow"], p["truncate"]
    )


def _dynamic_yarn(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    return formulas.dynamic_yarn(
        rope.rope_theta, rope.dim, original, seq_len, p.get("factor"), p["beta_fast"], p["beta_slow"],
        p["truncate"], p.get("mscale") or 1.0, p.get("mscale_all_dim") or 0.0,
    )


def _llama3(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    return formulas.llama3(
        rope.rope_theta, rope.dim, p["factor"], original, p["low_freq_factor"], p["high_freq_factor"]
    )


def longrope_factor(p: dict[str, Any], rope: ModelRope) -> float:
    """``factor`` if given, else max_position_embeddings / original (Phi-3's convention)."""
    if p.get("factor") is not None:
        return p["factor"]
    if rope.max_position_embeddings is None:
        return 1.0
    return rope.max_position_embeddings / _original(p, rope)


def _longrope(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    rescale = p["long_factor"] if seq_len > original else p["short_factor"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = formulas.longrope_attention_factor(longrope_factor(p, rope), original)
    return formulas.longrope(rope.rope_theta, rope.dim, rescale, attention_factor)


# ---------------------------------------------------------------- checks between parameters


def _beta_order(p: dict[str, Any], name: str) -> list[str]:
    if p["beta_fast"] > p["beta_slow"]:
        return []
    return [f"beta_fast={p['beta_fast']!r} must be greater than beta_slow={p['beta_slow']!r} for method {name!r}"]


def _llama3_order(p: dict[str, Any], name: str) -> list[str]:
    if p["high_freq_factor"] > p["low_freq_factor"]:
        return []
    return [
        f"high_freq_factor={p['high_freq_factor']!r} must be greater than "
        f"low_freq_factor={p['low_freq_factor']!r} for method {name!r}"
    ]


def _reconcile_ntk(p: dict[str, Any], name: str) -> list[str]:
    """``ntk`` takes alpha or factor (alpha = factor); both must agree."""
    alpha, factor = p.get("alpha"), p.get("factor")
    if alpha is None and factor is None:
        return [f"method {name!r} needs alpha (or factor, used as alpha), a number >= 1"]
    if alpha is not None and factor is not None and not math.isclose(alpha, factor, rel_tol=1e-12):
        return [f"alpha={alpha!r} and factor={factor!r} disagree for method {name!r}; give one, or equal values"]
    p["alpha"] = alpha if alpha is not None else factor
    p.pop("factor", None)
    return []


def _longrope_lists(p: dict[str, Any], rope: ModelRope) -> list[str]:
    pairs = rope.dim // 2
    problems = [
        f"{key} has {len(p[key])} values but the model rotates {rope.dim} channels, so it needs {pairs} (one per pair)"
        for key in ("short_factor", "long_factor")
        if len(p[key]) != pairs
    ]
    if problems:
        return problems
    # a factor so small (a denormal such as 5e-324) that the frequency overflows is refused too
    for key in ("short_factor", "long_factor"):
        inv_freq = formulas.longrope(rope.rope_theta, rope.dim, p[key]).inv_freq
        if not torch.isfinite(inv_freq).all():
            i = int((~torch.isfinite(inv_freq)).nonzero()[0])
            problems.append(
                f"{key}[{i}]={p[key][i]!r} makes that pair's frequency infinite; valid: factors whose "
                f"frequencies stay finite (about > {float(formulas.default_inv_freq(rope.rope_theta, rope.dim)[i]) / 1e308:.3g})"
            )
    return problems


# ---------------------------------------------------------------- transformers' schema


def _hf(rope_type: str, rope: ModelRope, p: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    recorded = {"rope_type": rope_type, "rope_theta": rope.rope_theta}
    recorded.update({k: p[k] for k in keys if p.get(k) is not None})
    return recorded


def _yarn_hf(p: dict[str, Any], rope: ModelRope) -> dict[str, Any]:
    keys = ("factor", "beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")
    recorded = _hf("yarn", rope, p, keys)
    recorded["original_max_position_embeddings"] = _original(p, rope)
    # transformers uses mscale / mscale_all_dim only as a pair: spell a lone one out
    if p.get("attention_factor") is None and (p.get("mscale") is None) != (p.get("mscale_all_dim") is None):
        recorded["attention_factor"] = _yarn(p, rope, _original(p, rope), 0).attention_factor
    return recorded


def _dynamic_ntk_hf(p: dict[str, Any], rope: ModelRope) -> dict[str, Any] | None:
    # transformers' "dynamic" measures the length against max_position_embeddings, every length
    if (p.get("step") or 1) != 1:
        return None
    if rope.max_position_embeddings is not None and _original(p, rope) != rope.max_position_embeddings:
        return None
    return _hf("dynamic", rope, p, ("factor",))


def _longrope_hf(p: dict[str, Any], rope: ModelRope) -> dict[str, Any]:
    recorded = _hf("longrope", rope, p, ("short_factor", "long_factor", "attention_factor"))
    recorded["short_factor"] = list(p["short_factor"])
    recorded["long_factor"] = list(p["long_factor"])
    recorded["factor"] = longrope_factor(p, rope)
    recorded["original_max_position_embeddings"] = _original(p, rope)
    return recorded


FACTOR = Param("factor", "context extension ratio (new length / original length)", required=True, minimum=1.0)
ORIGINAL = Param(
    "original_max_position_embeddings",
    "context length the model was trained with; default: read from the model config",
    kind="int",
    above=0,
)
STEP = Param(
    "step",
    "past the original length, round the length the scale is computed for up to a multiple of this "
    "(fewer scaling changes, so fewer re-rotations of cached keys); default 1: every length",
    kind="int",
    minimum=1,
)
BETA_FAST = Param("beta_fast", "pairs rotating more often than this in L keep their frequency", 32.0, above=0)
BETA_SLOW = Param("beta_slow", "pairs rotating fewer times than this in L are fully interpolated", 1.0, above=0)
TRUNCATE = Param("truncate", "round the ramp bounds to whole pairs", True, kind="bool")
MSCALE = Param("mscale", "DeepSeek's numerator temperature: 0.1*mscale*ln(factor)+1 (default 1)", above=0)
MSCALE_ALL_DIM = Param(
    "mscale_all_dim", "DeepSeek's denominator temperature: 0.1*mscale_all_dim*ln(factor)+1 (default 0)", minimum=0
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "none",
            "Su et al. 2021, RoFormer (arXiv:2104.09864): unscaled RoPE",
            (),
            lambda p, rope, original, seq_len: formulas.default(rope.rope_theta, rope.dim),
            hf_rope_type="default",
            to_hf=lambda p, rope: _hf("default", rope, p, ()),
        ),
        Method(
            "linear",
            "Chen et al. 2023, position interpolation (arXiv:2306.15595)",
            (FACTOR,),
            lambda p, rope, original, seq_len: formulas.linear(rope.rope_theta, rope.dim, p["factor"]),
            hf_rope_type="linear",
            aliases=("pi",),
            to_hf=lambda p, rope: _hf("linear", rope, p, ("factor",)),
        ),
        Method(
            "ntk",
            "bloc97 2023, NTK-aware scaling; YaRN paper eq. 16 (arXiv:2309.00071)",
            (
                Param("alpha", "NTK scale: base * alpha**(d/(d-2)); default: equal to factor", minimum=1.0),
                Param("factor", "accepted as alpha when alpha is not given", minimum=1.0),
            ),
            lambda p, rope, original, seq_len: formulas.ntk(rope.rope_theta, rope.dim, p["alpha"]),
            aliases=("ntk-aware",),
            check=_reconcile_ntk,
            # static NTK is exactly the default RoPE with a larger base
            to_hf=lambda p, rope: {
                "rope_type": "default",
                "rope_theta": formulas.ntk_base(rope.rope_theta, rope.dim, p["alpha"]),
            },
        ),
        Method(
            "dynamic-ntk",
            "emozilla 2023, dynamic NTK; YaRN paper sec. 3.3 (arXiv:2309.00071)",
            (FACTOR, ORIGINAL, STEP),
            lambda p, rope, original, seq_len: formulas.dynamic_ntk(
                rope.rope_theta, rope.dim, p["factor"], original, seq_len
            ),
            dynamic=True,
            hf_rope_type="dynamic",
            aliases=("dynamic",),
            to_hf=_dynamic_ntk_hf,
        ),
        Method(
            "ntk-by-parts",
            "bloc97 2023, NTK-by-parts; YaRN paper eqs. 17-18 (arXiv:2309.00071)",
            (FACTOR, ORIGINAL, BETA_FAST, BETA_SLOW, TRUNCATE),
            _ntk_by_parts,
            hf_rope_type="yarn",
            aliases=("by-parts",),
            check=_beta_order,
            # YaRN without the temperature
            to_hf=lambda p, rope: {**_yarn_hf(p, rope), "attention_factor": 1.0},
        ),
        Method(
            "yarn",
            "Peng et al. 2023, YaRN (arXiv:2309.00071)",
            (
                FACTOR,
                ORIGINAL,
                BETA_FAST,
                BETA_SLOW,
                Param("attention_factor", "cos/sin multiplier; default from factor, mscale, mscale_all_dim", above=0),
                TRUNCATE,
                MSCALE,
                MSCALE_ALL_DIM,
            ),
            _yarn,
            hf_rope_type="yarn",
            check=_beta_order,
            to_hf=_yarn_hf,
        ),
        Method(
            "dynamic-yarn",
            "Peng et al. 2023, YaRN with dynamic scaling s = max(1, l/L) (arXiv:2309.00071, sec. 3.3)",
            (
                Param("factor", "largest scale used: s = min(l/L, factor); default: no cap", minimum=1.0),
                ORIGINAL,
                BETA_FAST,
                BETA_SLOW,
                TRUNCATE,
                MSCALE,
                MSCALE_ALL_DIM,
                STEP,
            ),
            _dynamic_yarn,
            dynamic=True,
            check=_beta_order,
        ),
        Method(
            "llama3",
            "Meta 2024, Llama 3.1 scaling (arXiv:2407.21783)",
            (
                FACTOR,
                ORIGINAL,
                Param("low_freq_factor", "pairs turning fewer times than this in L are divided by factor", 1.0, above=0),
                Param("high_freq_factor", "pairs turning more times than this in L are kept", 4.0, above=0),
            ),
            _llama3,
            hf_rope_type="llama3",
            check=_llama3_order,
            to_hf=lambda p, rope: {
                **_hf("llama3", rope, p, ("factor", "low_freq_factor", "high_freq_factor")),
                "original_max_position_embeddings": _original(p, rope),
            },
        ),
        Method(
            "longrope",
            "Ding et al. 2024, LongRoPE (arXiv:2402.13753), as in Phi-3",
            (
                Param("short_factor", "per-pair rescale factors up to the original length", required=True,
                      kind="floats", above=0),
                Param("long_factor", "per-pair rescale factors past the original length", required=True,
                      kind="floats", above=0),
                Param("factor", "extension ratio for the attention factor; default max_position_embeddings / L",
                      minimum=1.0),
                ORIGINAL,
                Param("attention_factor", "cos/sin multiplier; default sqrt(1 + ln(factor) / ln(L))", above=0),
            ),
            _longrope,
            dynamic=True,
            hf_rope_type="longrope",
            check_model=_longrope_lists,
            to_hf=_longrope_hf,
        ),
    ]
}

_ALIASES = {alias: m.name for m in METHODS.values() for alias in (m.name, *m.aliases)}


def get_method(name: Any) -> Method:
    """Look a method up by name or alias; unknown names list the valid ones."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    if key not in _ALIASES:
        valid = ", ".join(METHODS)
        raise InvalidParameterError(f"method={name!r} is not a known RoPE method; valid methods: {valid}.")
    return METHODS[_ALIASES[key]]


def _check_value(method: Method, spec: Param, value: Any) -> tuple[Any, str | None]:
    """Coerce one value to its kind; return (value, problem or None)."""
    where = f"{spec.name}={value!r} for method {method.name!r}"
    if spec.kind == "floats":
        return _check_list(method, spec, value)
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value, None
        return value, f"{where} must be true or false"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value, f"{where} must be a number"
    value = int(value) if isinstance(value, numbers.Integral) else float(value)  # numpy scalars too
    if spec.kind == "int":
        if not (math.isfinite(value) and float(value).is_integer()):
            return value, f"{where} must be a whole number"
        value = int(value)
    value = float(value) if spec.kind == "float" else value
    if not math.isfinite(value):
        return value, f"{where} must be a finite number"
    if spec.minimum is not None and value < spec.minimum:
        return value, f"{where} must be >= {spec.minimum:g}"
    if spec.above is not None and value <= spec.above:
        return value, f"{where} must be > {spec.above:g}"
    return value, None


def validate_params(method: Method | str, params: dict[str, Any]) -> dict[str, Any]:
    """Check user parameters of ``method``; return them complete with defaults.

    Every problem is collected and one ``InvalidParameterError`` lists them.
    """
    method = get_method(method) if isinstance(method, str) else method
    problems: list[str] = []
    resolved: dict[str, Any] = {}
    for key, value in params.items():
        spec = method.param(key)
        if spec is None:
            valid = ", ".join(p.name for p in method.params) or "none"
            problems.append(f"{key}={value!r} is not a parameter of method {method.name!r} (valid: {valid})")
            continue
        if value is None and not spec.required:
            continue
        value, problem = _check_value(method, spec, value)
        if problem:
            problems.append(problem)
        resolved[key] = value
    for spec in method.params:
        if spec.required and spec.name not in params:
            problems.append(f"method {method.name!r} needs {spec.name} ({spec.doc})")
        elif spec.name not in resolved and spec.default is not None:
            resolved[spec.name] = spec.default
    if method.check and not problems:
        problems += method.check(resolved, method.name)
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")
    return resolved


def _check_list(method: Method, spec: Param, value: Any) -> tuple[Any, str | None]:
    """A non-empty list of finite numbers, each past the bounds of ``spec``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
        return value, f"{spec.name}={value!r} for method {method.name!r} must be a non-empty list of numbers"
    items = []
    for i, item in enumerate(value):
        single = Param(f"{spec.name}[{i}]", spec.doc, minimum=spec.minimum, above=spec.above)
        item, problem = _check_value(method, single, item)
        if problem:
            return value, problem
        items.append(item)
    return items, None


def check_model(method: Method | str, params: dict[str, Any], rope: ModelRope) -> None:
    """Raise ``InvalidParameterError`` if validated ``params`` do not fit the model."""
    method = get_method(method) if isinstance(method, str) else method
    problems = method.check_model(params, rope) if method.check_model else []
    if problems:
        raise InvalidParameterError("; ".join(f"{p} for method {method.name!r}" for p in problems) + ".")


def to_hf(method: Method | str, params: dict[str, Any], rope: ModelRope) -> dict[str, Any] | None:
    """transformers' ``rope_parameters`` computing the same RoPE, or None if it has none."""
    method = get_method(method) if isinstance(method, str) else method
    return method.to_hf(params, rope) if method.to_hf else None


def frequencies(
    method: Method | str, params: dict[str, Any], rope: ModelRope, seq_len: int | None = None
) -> formulas.RopeFrequencies:
    """Evaluate ``method`` with validated ``params`` for one rotary module.

    ``seq_len`` matters only for dynamic methods; ``None`` means "not longer
    than the original context".
    """
    method = get_method(method) if isinstance(method, str) else method
    original = int(params.get("original_max_position_embeddings") or rope.original_max_position_embeddings)
    return method.compute(params, rope, original, seq_len or original)


def hf_types() -> dict[str, Method]:
    """transformers' rope types rope_ntk reproduces -> the method that reads them
    (``yarn`` -> yarn: ntk-by-parts is written as a yarn of attention factor 1)."""
    return {m.hf_rope_type: m for m in METHODS.values() if m.hf_rope_type and m.name != "ntk-by-parts"}


# keys of a transformers RoPE dict that describe the model, not the scaling
HF_MODEL_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section")


def from_hf(rope: Any, argument: str = "rope_parameters") -> tuple[Method, dict[str, Any]]:
    """Method and validated parameters of a transformers RoPE dict.

    Accepts the 5.x ``rope_parameters`` and the 4.x ``rope_scaling`` schema:
    the type under ``rope_type`` or ``type``, int or float numbers. Model
    keys (``rope_theta``, ``partial_rotary_factor``) are not parameters and
    are skipped. Problems raise ``InvalidParameterError`` naming the key.
    """
    if not isinstance(rope, dict):
        raise InvalidParameterError(f"{argument}={rope!r} must be a dict such as {{'rope_type': 'yarn', 'factor': 4}}.")
    given = [rope[k] for k in ("rope_type", "type") if k in rope]
    if len(given) == 2 and given[0] != given[1]:
        raise InvalidParameterError(
            f"{argument}['rope_type']={given[0]!r} and {argument}['type']={given[1]!r} disagree; give one."
        )
    rope_type = given[0] if given else "default"
    by_type = hf_types()
    if rope_type not in by_type:
        raise InvalidParameterError(
            f"{argument}['rope_type']={rope_type!r} is not a RoPE type rope_ntk can reproduce; "
            f"valid: {', '.join(by_type)}."
        )
    method = by_type[rope_type]
    params = {k: v for k, v in rope.items() if k not in ("rope_type", "type", *HF_MODEL_KEYS)}
    try:
        return method, validate_params(method, params)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{argument} (rope_type {rope_type!r}): {exc}") from None
