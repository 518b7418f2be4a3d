"""lm-evaluation-harness on a RoPE-scaled model (optional extra ``lmeval``).

Importing this module registers the model class ``rope_ntk`` with
``lm_eval``. lm-eval 0.4.13 discovers models only through its own table, so
its stock ``lm_eval`` command cannot see it; run it through this module,
which takes exactly lm_eval's arguments::

    python eval/lmeval.py --model rope_ntk \\
        --model_args pretrained=bundled,method=yarn,factor=2,dtype=bfloat16 \\
        --tasks hellaswag --device cpu   # lm_eval defaults to cuda:0

or, from Python, ``import rope_ntk.lmeval`` then
``lm_eval.simple_evaluate(model="rope_ntk", model_args=...)``.

Model arguments: ``pretrained`` is anything ``rope_ntk.load_model`` takes
('bundled', a directory, a .gguf file, a hub id); ``method`` and the
method's parameters (``factor``, ``beta_fast``...; a list parameter as
``1.0;1.1;1.2``) are checked by ``rope_ntk.methods`` before the model loads;
``dtype``, ``device`` and ``cache_consistent`` as in ``rope_ntk``; every
other argument is one of lm_eval's ``HFLM`` arguments (``batch_size``,
``max_length``...). ``max_length`` defaults to the scaled context: the
model's original context times ``factor``.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "rope_ntk.lmeval needs lm-evaluation-harness: pip install 'rope-ntk[lmeval]' (lm-eval==0.4.13)."
    ) from exc

from . import patching
from .errors import InvalidParameterError
from .loading import load_model
from .methods import get_method, validate_params

# HFLM arguments that make no sense once rope_ntk has loaded the model itself
_OWN = {"pretrained", "tokenizer", "dtype", "device", "backend", "revision", "subfolder", "parallelize",
        "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan", "peft", "delta", "autogptq",
        "gptqmodel", "gguf_file", "trust_remote_code", "use_fast_tokenizer"}
HFLM_ARGS = tuple(p for p in inspect.signature(HFLM.__init__).parameters if p not in {"self", "kwargs", *_OWN})


def split_args(method: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, method params, HFLM args) from lm_eval's model args.

    Unknown names are refused, listing the valid method parameters and HFLM
    arguments, so a misspelled ``factr=2`` never passes silently.
    """
    spec = get_method("none" if method is None else method)  # lm_eval parses "none" to None
    names = {p.name: p for p in spec.params}
    params, hf, problems = {}, {}, []
    for key, value in kwargs.items():
        if key in names:
            if names[key].kind == "floats" and isinstance(value, str):
                try:
                    value = [float(x) for x in value.split(";") if x.strip()]
                except ValueError:
                    problems.append(f"{key}={value!r} must be numbers separated by ';'")
                    continue
            params[key] = value
        elif key in HFLM_ARGS:
            hf[key] = value
        else:
            valid_m = ", ".join(names) or "none"
            problems.append(
                f"{key}={value!r} is neither a parameter of method {spec.name!r} (valid: {valid_m}) "
                f"nor an lm_eval HFLM argument (valid: {', '.join(HFLM_ARGS)})"
            )
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")
    validate_params(spec, params)
    return spec.name, params, hf


@register_model("rope_ntk", "rope-ntk")
class RopeNtkLM(HFLM):
    """lm_eval's Hugging Face LM over a model patched by ``rope_ntk.patch``."""

    def __init__(
        self,
        pretrained: str = "bundled",
        method: str | None = "none",
        dtype: str = "float32",
        device: str = "cpu",
        cache_consistent: bool | None = None,
        **kwargs: Any,
    ) -> None:
        name, params, hf = split_args(method, kwargs)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes --device, whose default is cuda
            raise InvalidParameterError(f"device={device!r} but this torch has no CUDA device; pass --device cpu.")
        model, tokenizer = load_model(str(pretrained), dtype=dtype, device=device)
        self.rope_handle = patching.patch(model, name, cache_consistent=cache_consistent, **params)
        self.rope_method, self.rope_params = name, params
        if hf.get("max_length") is None and "factor" in params:
            rope = patching.describe(model)[0]
            hf["max_length"] = int(rope["original_max_position_embeddings"] * params["factor"])
        super().__init__(pretrained=model, tokenizer=tokenizer, **hf)

    def get_model_info(self) -> dict:
        """What lm_eval records about the model; unlike HFLM's, asks the Hub nothing."""
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "rope_ntk": {"method": self.rope_method, "params": self.rope_params},
        }


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line, with the ``rope_ntk`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except InvalidParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

