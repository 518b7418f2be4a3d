"""Tiny, seeded, float32 Llama / Mistral / Qwen2 models shared by the tests.

The models are built from ``AutoConfig.for_model`` with tiny sizes (hidden 64,
4 heads of width 16, 2 layers, vocabulary 128) and an original context of
``ORIGINAL`` = 64 positions, so that inputs of 100-150 tokens run well past it.
"""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ORIGINAL = 64  # max_position_embeddings of every tiny config: the original context
LONG = 150  # length of the "long" test input, well past ORIGINAL
VOCAB = 128
FAMILIES = ("llama", "mistral", "qwen2")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=ORIGINAL,
    # larger than the default 0.02 so that attention is far from uniform and
    # a change of RoPE is clearly visible in the logits
    initializer_range=0.1,
    tie_word_embeddings=False,
)


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# transformers 4.x config keyword names that differ from the 5.x rope_parameters keys
NAMES_4X = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}
# 4.x configs that validate rope_scaling the old way: the only keys allowed besides "type"
OLD_STYLE_4X = {"olmo": ("factor",), "olmo2": ("factor",), "phi3": ("short_factor", "long_factor")}


def as_4x(rope: dict, family: str = "") -> dict:
    """5.x ``rope_parameters`` as the 4.x keyword arguments (scripts/test_transformers4.sh)."""
    if "full_attention" in rope:  # Gemma 3: global RoPE plus a local base
        return {**as_4x(rope["full_attention"], family), "rope_local_base_freq": rope["sliding_attention"]["rope_theta"]}
    rope = dict(rope)
    names = NAMES_4X.get(family, {})
    kwargs = {names.get("rope_theta", "rope_theta"): rope.pop("rope_theta")}
    if "partial_rotary_factor" in rope:
        kwargs[names.get("partial_rotary_factor", "partial_rotary_factor")] = rope.pop("partial_rotary_factor")
    rope_type = rope.pop("rope_type", "default")
    if rope_type == "default":
        kwargs["rope_scaling"] = None
    elif family in OLD_STYLE_4X:  # these 4.x configs accept exactly "type" and a few keys
        kwargs["rope_scaling"] = {"type": rope_type, **{k: rope[k] for k in OLD_STYLE_4X[family]}}
    else:
        kwargs["rope_scaling"] = {"rope_type": rope_type, **rope}
    return kwargs


def rope_dict(config) -> dict:
    """The config's RoPE in the 5.x ``rope_parameters`` shape, read from a 5.x or a 4.x config.

    Written independently of rope_ntk's own reader: 4.x keeps ``rope_theta``,
    ``partial_rotary_factor`` and ``rope_scaling`` (type under ``type`` or
    ``rope_type``) apart, and Gemma 3's local base in ``rope_local_base_freq``.
    """
    if not TRANSFORMERS_4:
        return copy.deepcopy(config.rope_parameters)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", "default")
    scaling.pop("type", None)
    rope = {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling}
    if getattr(config, "partial_rotary_factor", None) not in (None, 1.0):
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    if getattr(config, "rope_local_base_freq", None) is not None:
        return {"full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base_freq}}
    return rope


# transformers 4.57's own dynamic / yarn / longrope functions compute the width as
# getattr(config, "head_dim", hidden // heads) and crash on the head_dim=None that its
# Mistral config stores by default, so the tiny Mistral states its head width
HEAD_DIM_NEEDED = ("mistral",)


def make_config(family: str = "llama", **overrides):
    """A tiny config of ``family``; ``overrides`` replace the TINY sizes."""
    if family in HEAD_DIM_NEEDED:
        overrides.setdefault("head_dim", overrides.get("hidden_size", TINY["hidden_size"])
                             // overrides.get("num_attention_heads", TINY["num_attention_heads"]))
    if TRANSFORMERS_4 and "rope_parameters" in overrides:
        overrides.update(as_4x(overrides.pop("rope_parameters"), family))
    return AutoConfig.for_model(family, **{**TINY, **overrides})


def make_model(config, seed: int = 0):
    """A seeded float32 causal LM in eval mode, built from ``config``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of one full forward pass, no cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def token_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


# Per-family overrides that keep every family tiny and valid (token ids inside
# the vocabulary, head width 16, a few small experts, two layers of each kind).
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILY_SIZES: dict[str, dict] = {
    "llama": {},
    "mistral": {},  # head_dim: see tiny.HEAD_DIM_NEEDED
    # head_dim given: transformers' own dynamic / yarn / longrope fail on Mixtral's head_dim=None
    "mixtral": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "phi": dict(num_key_value_heads=4),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=ORIGINAL),
    "gpt_neox": dict(num_key_value_heads=4, bos_token_id=1, eos_token_id=2),
    "gptj": dict(rotary_dim=8, bos_token_id=1, eos_token_id=2, num_key_value_heads=4),
    "stablelm": dict(num_key_value_heads=4),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo": {},
    "olmo2": {},
    "cohere": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "falcon": dict(num_key_value_heads=4, bos_token_id=1, eos_token_id=2),
    "granite": {},
    # as many key-value heads as heads: transformers 4.x's DeepSeek-V3 attention fails with fewer
    "deepseek_v3": dict(num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=None,
                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, n_shared_experts=1),
    "starcoder2": {},
    "persimmon": dict(num_key_value_heads=4),
    "helium": dict(head_dim=16),
    "nemotron": dict(head_dim=16, bos_token_id=1, eos_token_id=2),
}


def make_family_config(model_type: str, **overrides):
    """A tiny config of any family in FAMILY_SIZES; ``overrides`` win."""
    return make_config(model_type, **{**FAMILY_SIZES[model_type], **overrides})
