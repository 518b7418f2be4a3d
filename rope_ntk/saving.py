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
``rope_theta`` at the top and the scaling in ``rope_scaling``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError
from .patching import apply_recorded

SCHEMAS = ("5.x", "4.x")


def save_pretrained(model, directory: str | Path, schema: str = "5.x", **kwargs: Any) -> Path:
    """``model.save_pretrained(directory, **kwargs)``, config in the given schema."""
    if schema not in SCHEMAS:
        raise InvalidParameterError(f"schema={schema!r} is not a config schema; valid: {', '.join(SCHEMAS)}.")
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    if schema == "4.x":
        path = directory / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(to_4x(config), indent=2, sort_keys=True) + "\n")
    return directory


def to_4x(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with ``rope_parameters`` spelled as 4.x's ``rope_theta`` + ``rope_scaling``."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters", None) or {})
    if rope and not {"rope_type", "type", "rope_theta"} & set(rope):
        # TODO: per-layer-type RoPE (Gemma 3) had its own 4.x keys (rope_local_base_freq); not written yet
        raise InvalidParameterError(
            f"schema='4.x' cannot express per-layer-type rope_parameters (keys {sorted(rope)}); use schema='5.x'."
        )
    if "rope_theta" in rope:
        config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    # both spellings: older 4.x releases read "type", later ones "rope_type"
    config["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, "type": rope_type, **rope}
    return config


def from_pretrained(path: str | Path, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` that re-applies a saved rope_ntk patch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    apply_recorded(model)
    return model
