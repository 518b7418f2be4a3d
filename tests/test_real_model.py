"""The bundled SmolLM2-135M (GGUF) on the bundled Paul Graham essays.

Loaded once per module (about 20 s); every forward is 1024 tokens, well
inside the model's own 8192-token context. Select with ``-m real_model``,
leave out with ``-m "not real_model"``.
"""

from __future__ import annotations

import math
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

import rope_ntk
from rope_ntk.data import BUNDLED_DISTRIBUTION as CORPUS_DISTRIBUTION
from rope_ntk.loading import BUNDLED_DISTRIBUTION as MODEL_DISTRIBUTION

pytestmark = pytest.mark.real_model

TOKENS = 1024


def _require(distribution: str) -> None:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        pytest.skip(f"asset package {distribution!r} is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def bundled():
    _require(MODEL_DISTRIBUTION)
    _require(CORPUS_DISTRIBUTION)
    model, tokenizer = rope_ntk.load_model("bundled")
    docs = rope_ntk.load_corpus("bundled")
    text = "\n\n".join(docs)[:40_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :TOKENS]
    assert ids.shape == (1, TOKENS)
    yield model, ids
    rope_ntk.unpatch(model)


@pytest.fixture(scope="module")
def stock_logits(bundled):
    model, ids = bundled
    assert not rope_ntk.is_patched(model)
    return _logits(model, ids)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _perplexity(logits, ids) -> float:
    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(loss.item())


def test_bundled_model_is_what_the_tests_assume(bundled):
    model, _ = bundled
    assert model.dtype == torch.float32 and not model.training
    (entry,) = rope_ntk.describe(model)
    assert entry["method"] == "none"
    assert model.config.max_position_embeddings > TOKENS  # so dynamic-ntk must not scale here


def test_stock_perplexity_is_sane(bundled, stock_logits):
    _, ids = bundled
    assert stock_logits.shape == (1, TOKENS, bundled[0].config.vocab_size)
    ppl = _perplexity(stock_logits, ids)
    assert 2.0 < ppl < 60.0, f"perplexity {ppl:.2f} on essay text"
    # a shuffled text must be much harder: the model does use the context
    shuffled = ids[:, torch.randperm(TOKENS, generator=torch.Generator().manual_seed(0))]
    assert _perplexity(_logits(bundled[0], shuffled), shuffled) > 2 * ppl


def test_yarn_changes_logits_and_unpatch_restores(bundled, stock_logits):
    model, ids = bundled
    with rope_ntk.patch(model, "yarn", factor=2):
        yarn = _logits(model, ids)
    diff = (yarn - stock_logits).abs().max().item()
    assert diff > 1e-2 * stock_logits.abs().max().item()
    # YaRN within the original context costs little: still a sane language model
    assert _perplexity(yarn, ids) < 60.0
    assert not rope_ntk.is_patched(model)
    assert torch.equal(_logits(model, ids), stock_logits)


def test_dynamic_ntk_within_context_is_none_bit_for_bit(bundled):
    model, ids = bundled
    rope_ntk.patch(model, "none")
    none = _logits(model, ids)
    rope_ntk.patch(model, "dynamic-ntk", factor=2)
    dynamic = _logits(model, ids)
    rope_ntk.unpatch(model)
    assert torch.equal(dynamic, none)


def test_verify_on_the_bundled_model(bundled):
    """rope_ntk.verify on the real model: stock, patched, and a tampered buffer named."""
    model, _ = bundled
    assert rope_ntk.verify(model).ok
    rope_ntk.patch(model, "yarn", factor=4)
    try:
        (check,) = rope_ntk.verify(model).checks
        assert check.method == "yarn" and check.inv_freq_error <= 1e-6
        assert check.expected_attention_factor == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
        with torch.no_grad():
            model.model.rotary_emb.inv_freq[5] *= 1.0001
        with pytest.raises(rope_ntk.RopeMismatchError, match="'model.rotary_emb'"):
            rope_ntk.verify(model)
    finally:
        rope_ntk.unpatch(model)
