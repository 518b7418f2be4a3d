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

from . import formulas
from .errors import InvalidParameterError


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a method."""

    name: str
    doc: str
    default: Any = None
    required: bool = False
    kind: str = "float"  # "float" | "int" | "bool"
    minimum: float | None = None  # inclusive lower bound, for numbers
    above: float | None = None  # exclusive lower bound, for numbers


@dataclass(frozen=True)
class Method:
    """A RoPE scaling method as the registry knows it."""

    name: str
    paper: str
    params: tuple[Param, ...]
    # (validated params, model numbers, original length, current length) -> frequencies
    compute: Callable[[dict[str, Any], "ModelRope", int, int], formulas.RopeFrequencies]
    dynamic: bool = False
    # transformers' ``rope_type`` that computes the same thing, if any
    hf_rope_type: str | None = None
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class ModelRope:
    """The numbers a rotary module was built from (read off the model)."""

    rope_theta: float
    dim: int
    original_max_position_embeddings: int


def _yarn(p: dict[str, Any], rope: ModelRope, original: int, seq_len: int) -> formulas.RopeFrequencies:
    return formulas.yarn(
        rope.rope_theta,
        rope.dim,
        p["factor"],
        original,
        p["beta_fast"],
        p["beta_slow"],
        p.get("attention_factor"),
        p["truncate"],
    )


FACTOR = Param("factor", "context extension ratio (new length / original length)", required=True, minimum=1.0)
ORIGINAL = Param(
    "original_max_position_embeddings",
    "context length the model was trained with; default: read from the model config",
    kind="int",
    above=0,
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
        ),
        Method(
            "linear",
            "Chen et al. 2023, position interpolation (arXiv:2306.15595)",
            (FACTOR,),
            lambda p, rope, original, seq_len: formulas.linear(rope.rope_theta, rope.dim, p["factor"]),
            hf_rope_type="linear",
            aliases=("pi",),
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
        ),
        Method(
            "dynamic-ntk",
            "emozilla 2023, dynamic NTK; YaRN paper sec. 3.3 (arXiv:2309.00071)",
            (FACTOR, ORIGINAL),
            lambda p, rope, original, seq_len: formulas.dynamic_ntk(
                rope.rope_theta, rope.dim, p["factor"], original, seq_len
            ),
            dynamic=True,
            hf_rope_type="dynamic",
            aliases=("dynamic",),
        ),
        Method(
            "yarn",
            "Peng et al. 2023, YaRN (arXiv:2309.00071)",
            (
                FACTOR,
                ORIGINAL,
                Param("beta_fast", "pairs rotating more often than this in L keep their frequency", 32.0, above=0),
                Param("beta_slow", "pairs rotating fewer times than this in L are fully interpolated", 1.0, above=0),
                Param("attention_factor", "cos/sin multiplier; default 0.1*ln(factor)+1", above=0),
                Param("truncate", "round the ramp bounds to whole pairs", True, kind="bool"),
            ),
            _yarn,
            hf_rope_type="yarn",
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
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value, None
        return value, f"{where} must be true or false"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value, f"{where} must be a number"
    value = float(value) if isinstance(value, numbers.Real) and not isinstance(value, int) else int(value)
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
    if method.name == "ntk" and not problems:
        problems += _reconcile_ntk(resolved)
    if method.name == "yarn" and not problems and resolved["beta_fast"] <= resolved["beta_slow"]:
        problems.append(
            f"beta_fast={resolved['beta_fast']!r} must be greater than beta_slow={resolved['beta_slow']!r} "
            "for method 'yarn'"
        )
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")
    return resolved


def _reconcile_ntk(resolved: dict[str, Any]) -> list[str]:
    """``ntk`` takes alpha or factor (alpha = factor); both must agree."""
    alpha, factor = resolved.get("alpha"), resolved.get("factor")
    if alpha is None and factor is None:
        return ["method 'ntk' needs alpha (or factor, used as alpha), a number >= 1"]
    if alpha is not None and factor is not None and not math.isclose(alpha, factor, rel_tol=1e-12):
        return [f"alpha={alpha!r} and factor={factor!r} disagree for method 'ntk'; give one, or equal values"]
    resolved["alpha"] = alpha if alpha is not None else factor
    resolved.pop("factor", None)
    return []


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
