"""Issue 3's remaining proofs: autocast, one application of the attention
factor, and ``original_max_position_embeddings`` as the reference length."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_yarn
from tiny import ORIGINAL, make_config, make_model, token_ids
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import rope_ntk

CAPTURED: list[torch.Tensor] = []


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """sdpa attention that also records the pre-softmax q.k logits of layer 0."""
    if getattr(module, "layer_idx", 0) == 0:
        # query: [batch, heads, seq, head_dim]; key: [batch, kv_heads, seq, head_dim]
        groups = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(groups, dim=1)
        CAPTURED.append((query @ keys.transpose(-1, -2) * scaling).detach().double())
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register("rope_ntk_capture", _capturing_attention)


def _qk_logits(model, ids) -> torch.Tensor:
    CAPTURED.clear()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(CAPTURED) == 1
    return CAPTURED[0]


@pytest.mark.parametrize("attention_factor", [None, 1.7])
def test_attention_factor_scales_qk_logits_exactly_once(attention_factor):
    """cos and sin each carry the factor a, so q.k logits scale by a**2: no
    more (applied twice: a**4) and no less (dropped: 1)."""
    model = make_model(make_config("llama"))
    model.set_attn_implementation("rope_ntk_capture")
    ids = token_ids(100)
    factor = 4.0
    rope_ntk.patch(model, "yarn", factor=factor, attention_factor=1.0)
    plain = _qk_logits(model, ids)
    params = {} if attention_factor is None else {"attention_factor": attention_factor}
    rope_ntk.patch(model, "yarn", factor=factor, **params)
    scaled = _qk_logits(model, ids)
    a = attention_factor if attention_factor is not None else 0.1 * math.log(factor) + 1
    assert rope_ntk.describe(model)[0]["attention_factor"] == pytest.approx(a, rel=1e-12)
    torch.testing.assert_close(scaled, plain * a * a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_phases_stay_float32_under_autocast(dtype):
    """Under CPU autocast the angles are still formed in float32: cos/sin
    equal the float32 computation cast once to the activation dtype."""
    model = make_model(make_config("llama"))
    handle = rope_ntk.patch(model, "yarn", factor=4.0)
    module = model.model.rotary_emb
    positions = torch.arange(0, 131_073)[None]
    x = torch.zeros(1, 1, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = module(x, positions)
        logits = model(input_ids=token_ids(100), use_cache=False).logits
    inv32 = torch.from_numpy(ref_yarn(10_000.0, 16, 4.0, ORIGINAL)[0]).to(torch.float32)
    angles = positions[..., None].to(torch.float32) * inv32
    emb = torch.cat((angles, angles), dim=-1)
    scale = 0.1 * math.log(4.0) + 1
    assert module.inv_freq.dtype == torch.float32
    assert torch.equal(cos, (emb.cos() * scale).to(dtype))
    assert torch.equal(sin, (emb.sin() * scale).to(dtype))
    assert torch.isfinite(logits.float()).all()
    handle.unpatch()


def test_reference_length_is_original_not_max_position_embeddings():
    """A config already stretched (max_position_embeddings = 4 x original)
    must ramp YaRN against the original length, not the stretched one."""
    original, stretched = 32, 128
    config = make_config(
        "llama",
        max_position_embeddings=stretched,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 4.0,
            "original_max_position_embeddings": original,
        },
    )
    model = make_model(config)
    rope_ntk.patch(model, "yarn", factor=2.0)
    (entry,) = [e for e in rope_ntk.describe(model) if e["module"] == "model.rotary_emb"]
    assert entry["original_max_position_embeddings"] == original
    want = torch.from_numpy(ref_yarn(10_000.0, 16, 2.0, original)[0]).to(torch.float32)
    wrong = torch.from_numpy(ref_yarn(10_000.0, 16, 2.0, stretched)[0]).to(torch.float32)
    got = model.model.rotary_emb.inv_freq
    assert torch.equal(got, want)
    assert not torch.equal(got, wrong)  # the two lengths really give different ramps here
