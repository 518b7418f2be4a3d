"""Save a patched model so that it loads back with the same RoPE.

The config written by ``model.save_pretrained`` already carries the scaling
(``patching`` records it): in transformers' own ``rope_parameters`` when
transformers can compute it, and always in a ``rope_ntk`` entry with the
method, its parameters and the unscaled RoPE. So:

* native methods reload in plain transformers, no rope_ntk needed;
* the others (``dynamic-yarn``, every method on GPT-J) reload unscaled in
  plain transformers, and scaled through ``rope_ntk.from_pretrained`` /
  ``rope_ntk.load_model``, which re-apply the record.

``schema="4.x"`` rewrites the config for transformers 4.x readers:
``rope_theta`` at the top and the scaling in ``rope_scaling`` (Gemma 3:
``rope_scaling`` for the global layers, ``rope_local_base_freq`` for the
local ones). Under transformers 4.x the config is written in that schema
by transformers itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import families
from .errors import InvalidParameterError
from .patching import apply_recorded, to_4x_attributes

SCHEMAS = ("5.x", "4.x")


def installed_schema() -> str:
    """The config schema the installed transformers writes: "5.x" or "4.x"."""
    import transformers

    return "4.x" if int(transformers.__version__.split(".")[0]) < 5 else "5.x"


def save_pretrained(model, directory: str | Path, schema: str | None = None, **kwargs: Any) -> Path:
    """``model.save_pretrained(directory, **kwargs)``, config in the given schema.

    ``schema`` defaults to the installed transformers' own. With transformers
    5.x both can be written; transformers 4.x writes only its own, "4.x".
    """
    if schema is None:
        schema = installed_schema()
    if schema not in SCHEMAS:
        raise InvalidParameterError(f"schema={schema!r} is not a config schema; valid: {', '.join(SCHEMAS)}.")
    if schema == "5.x" and installed_schema() == "4.x":
        raise InvalidParameterError(
            "schema='5.x' needs transformers 5.x installed (transformers 4.x keeps no rope_parameters to write); "
            "use schema='4.x', which transformers 5.x also reads."
        )
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    if schema == "4.x" and installed_schema() == "5.x":
        path = directory / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(to_4x(config), indent=2, sort_keys=True) + "\n")
    return directory


def to_4x(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with ``rope_parameters`` spelled as 4.x's ``rope_theta`` + ``rope_scaling``.

    Gemma 3's per-layer-type RoPE becomes ``rope_scaling`` for the global
    layers and ``rope_local_base_freq`` for the local ones, as 4.x wrote it;
    a scaled local RoPE has no 4.x spelling and raises InvalidParameterError.
    """
    config = dict(config)
    rope = config.pop("rope_parameters", None) or {}
    family = families.FAMILIES.get(config.get("model_type")) or families.Family(str(config.get("model_type")), "")
    config.update(to_4x_attributes(rope, family, config.get("max_position_embeddings")))
    return config


def from_pretrained(path: str | Path, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` that re-applies a saved rope_ntk patch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    apply_recorded(model)
    return model
