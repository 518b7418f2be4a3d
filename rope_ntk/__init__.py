"""rope_ntk: extend the context of Hugging Face causal LMs by rescaling RoPE.

    import rope_ntk
    model, tokenizer = rope_ntk.load_model("bundled")
    with rope_ntk.patch(model, "yarn", factor=2):
        ...  # forward, generate: the scaled RoPE is in effect
"""

from .errors import (
    CorpusError,
    InvalidParameterError,
    ModelLoadError,
    RopeMismatchError,
    RopeNtkError,
    UnsupportedModelError,
)
from .formulas import RopeFrequencies
from .loading import load_model, to_dtype
from .data import load_corpus
from .methods import METHODS, get_method, validate_params
from .patching import (
    PatchHandle,
    apply_recorded,
    describe,
    find_rotary_modules,
    is_patched,
    patch,
    patch_from_hf,
    unpatch,
)
from .rotary import ScaledRotaryEmbedding
from .saving import from_pretrained, save_pretrained
from .families import FAMILIES
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "METHODS",
    "apply_recorded",
    "from_pretrained",
    "patch_from_hf",
    "save_pretrained",
    "CorpusError",
    "InvalidParameterError",
    "ModelLoadError",
    "PatchHandle",
    "RopeMismatchError",
    "VerifyReport",
    "RopeFrequencies",
    "RopeNtkError",
    "ScaledRotaryEmbedding",
    "UnsupportedModelError",
    "describe",
    "find_rotary_modules",
    "get_method",
    "is_patched",
    "load_corpus",
    "load_model",
    "patch",
    "to_dtype",
    "unpatch",
    "validate_params",
    "verify",
]
