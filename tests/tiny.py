"""Tiny, seeded, float32 Llama / Mistral / Qwen2 models shared by the tests.

The models are built from ``AutoConfig.for_model`` with tiny sizes (hidden 64,
4 heads of width 16, 2 layers, vocabulary 128) and an original context of
``ORIGINAL`` = 64 positions, so that inputs of 100-150 tokens run well past it.
"""

from __future__ import annotations

import torch
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


def make_config(family: str = "llama", **overrides):
    """A tiny config of ``family``; ``overrides`` replace the TINY sizes."""
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
