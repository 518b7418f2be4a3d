"""patch / unpatch / describe on tiny Llama, Mistral and Qwen2 models.

Original context: 64 positions; "long" inputs are 150 tokens.
"""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from reference import ref_default, ref_yarn
from tiny import LONG, ORIGINAL, logits_of, make_config, make_model, token_ids

import rope_ntk

METHODS = [
    ("linear", {"factor": 2.0}),
    ("ntk", {"alpha": 4.0}),
    ("dynamic-ntk", {"factor": 2.0}),
    ("yarn", {"factor": 4.0}),
]
STATIC = [m for m in METHODS if m[0] != "dynamic-ntk"]
# the parameters each of METHODS resolves to (defaults filled in, ntk's factor as alpha)
RESOLVED = {
    "linear": {"factor": 2.0},
    "ntk": {"alpha": 4.0},
    "dynamic-ntk": {"factor": 2.0},
    "yarn": {"factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True},
}
IDS = [m for m, _ in METHODS]


def rotary(model) -> torch.nn.Module:
    (_, module), = rope_ntk.find_rotary_modules(model)
    return module


def assert_logits_close(actual, expected, rtol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def visibly_different(a, b) -> bool:
    return (a - b).abs().max().item() > 1e-3 * b.abs().max().item()


# ---------------------------------------------------------------- patch / unpatch


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_patch_changes_logits_on_long_input(model, method, params, long_ids):
    stock = logits_of(model, long_ids)
    handle = rope_ntk.patch(model, method, **params)
    assert rope_ntk.is_patched(model)
    assert handle.method == method and handle.modules == ["model.rotary_emb"]
    assert isinstance(rotary(model), rope_ntk.ScaledRotaryEmbedding)
    patched = logits_of(model, long_ids)
    assert visibly_different(patched, stock)
    # position 0 has angle 0 under every method and the first token attends only
    # to itself, so its logits cannot move (masking and layout are intact)
    assert_logits_close(patched[:, 0], stock[:, 0], rtol=1e-5)


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_unpatch_restores_model_and_config_bit_for_bit(model, method, params, long_ids):
    stock = logits_of(model, long_ids)
    original_module = rotary(model)
    original_rope = copy.deepcopy(model.config.rope_parameters)
    assert not hasattr(model.config, "rope_ntk")

    rope_ntk.patch(model, method, **params)
    assert model.config.rope_ntk == {
        "method": method,
        "params": RESOLVED[method],
        "layer_types": None,
        "native": True,
        "original": original_rope,  # the unscaled RoPE, so a saved patch can be re-applied without stacking
    }
    assert rope_ntk.describe(model)[0]["params"] == RESOLVED[method]
    assert model.config.rope_parameters != original_rope
    logits_of(model, long_ids)

    rope_ntk.unpatch(model)
    assert not rope_ntk.is_patched(model)
    assert rotary(model) is original_module
    assert model.config.rope_parameters == original_rope
    assert not hasattr(model.config, "rope_ntk")
    assert torch.equal(logits_of(model, long_ids), stock)
    rope_ntk.unpatch(model)  # a second unpatch is a no-op
    assert torch.equal(logits_of(model, long_ids), stock)


def test_patch_records_native_rope_parameters(llama):
    rope_ntk.patch(llama, "yarn", factor=4, beta_fast=16)
    assert llama.config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 4.0,
        "beta_fast": 16.0,
        "beta_slow": 1.0,
        "truncate": True,
        "original_max_position_embeddings": ORIGINAL,
    }
    rope_ntk.patch(llama, "linear", factor=3)
    assert llama.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 3.0}
    assert llama.config.rope_ntk["method"] == "linear" and llama.config.rope_ntk["params"] == {"factor": 3.0}
    assert llama.config.rope_ntk["original"] == {"rope_type": "default", "rope_theta": 10_000.0}


@pytest.mark.parametrize("first,second", [(METHODS[0], METHODS[3]), (METHODS[3], METHODS[1]), (METHODS[2], METHODS[0])])
def test_patching_twice_replaces_never_stacks(family, first, second, long_ids):
    twice = make_model(make_config(family))
    original_module = rotary(twice)
    original_rope = copy.deepcopy(twice.config.rope_parameters)
    stock = logits_of(twice, long_ids)
    rope_ntk.patch(twice, first[0], **first[1])
    rope_ntk.patch(twice, second[0], **second[1])

    once = make_model(make_config(family))
    rope_ntk.patch(once, second[0], **second[1])
    assert torch.equal(logits_of(twice, long_ids), logits_of(once, long_ids))
    assert [d["method"] for d in rope_ntk.describe(twice)] == [second[0]]
    assert twice.config.rope_parameters == once.config.rope_parameters
    assert twice.config.rope_ntk == once.config.rope_ntk

    # one unpatch undoes both: the stock module and config come back
    rope_ntk.unpatch(twice)
    assert rotary(twice) is original_module
    assert twice.config.rope_parameters == original_rope
    assert not hasattr(twice.config, "rope_ntk")
    assert torch.equal(logits_of(twice, long_ids), stock)


def test_context_manager(llama, long_ids):
    stock = logits_of(llama, long_ids)
    reference = make_model(make_config("llama"))
    rope_ntk.patch(reference, "yarn", factor=2)
    expected = logits_of(reference, long_ids)

    with rope_ntk.patch(llama, "yarn", factor=2) as handle:
        assert isinstance(handle, rope_ntk.PatchHandle)
        assert rope_ntk.is_patched(llama)
        assert torch.equal(logits_of(llama, long_ids), expected)
    assert not rope_ntk.is_patched(llama)
    assert not hasattr(llama.config, "rope_ntk")
    assert torch.equal(logits_of(llama, long_ids), stock)

    # an exception inside the block still unpatches
    with pytest.raises(RuntimeError, match="boom"):
        with rope_ntk.patch(llama, "linear", factor=2):
            raise RuntimeError("boom")
    assert not rope_ntk.is_patched(llama)
    assert torch.equal(logits_of(llama, long_ids), stock)


def test_describe_reports_method_and_params(model, family):
    before = rope_ntk.describe(model)
    assert len(before) == 1
    assert before[0]["module"] == "model.rotary_emb"
    assert before[0]["method"] == "none"
    assert before[0]["class"] == type(rotary(model)).__name__ != "ScaledRotaryEmbedding"

    rope_ntk.patch(model, "yarn", factor=4, beta_slow=2)
    (entry,) = rope_ntk.describe(model)
    assert entry["module"] == "model.rotary_emb"
    assert entry["class"] == "ScaledRotaryEmbedding"
    assert entry["method"] == "yarn"
    assert entry["params"] == {"factor": 4.0, "beta_fast": 32.0, "beta_slow": 2.0, "truncate": True}
    assert entry["rope_theta"] == model.config.rope_parameters["rope_theta"] == 10_000.0
    assert entry["dim"] == 16  # 64 hidden / 4 heads
    assert entry["original_max_position_embeddings"] == ORIGINAL
    assert entry["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)

    rope_ntk.patch(model, "ntk", factor=3)
    (entry,) = rope_ntk.describe(model)
    assert (entry["method"], entry["params"], entry["attention_factor"]) == ("ntk", {"alpha": 3.0}, 1.0)

    rope_ntk.unpatch(model)
    assert rope_ntk.describe(model) == before


@pytest.mark.parametrize(
    "alias,name,params",
    [("pi", "linear", {"factor": 2}), ("PI", "linear", {"factor": 2}), ("ntk-aware", "ntk", {"alpha": 2}),
     ("dynamic", "dynamic-ntk", {"factor": 2}), ("Dynamic_NTK", "dynamic-ntk", {"factor": 2}),
     ("YaRN", "yarn", {"factor": 2})],
)
def test_method_aliases(llama, alias, name, params, long_ids):
    handle = rope_ntk.patch(llama, alias, **params)
    assert handle.method == name
    assert rope_ntk.describe(llama)[0]["method"] == name
    by_alias = logits_of(llama, long_ids)
    rope_ntk.patch(llama, name, **params)
    assert torch.equal(logits_of(llama, long_ids), by_alias)


# ---------------------------------------------------------------- baselines


def test_patch_none_is_close_to_stock(model, long_ids):
    stock = logits_of(model, long_ids)
    rope_ntk.patch(model, "none")
    assert_logits_close(logits_of(model, long_ids), stock, rtol=1e-5)


def test_dynamic_ntk_is_none_up_to_original_length(model, family, long_ids, short_ids):
    none = make_model(make_config(family))
    rope_ntk.patch(none, "none")
    none_short, none_long = logits_of(none, short_ids), logits_of(none, long_ids)

    rope_ntk.patch(model, "dynamic-ntk", factor=4)
    assert short_ids.shape[1] == ORIGINAL
    assert torch.equal(logits_of(model, short_ids), none_short)
    assert torch.equal(logits_of(model, short_ids[:, :10]), logits_of(none, short_ids[:, :10]))
    # past the original context it scales...
    assert visibly_different(logits_of(model, long_ids), none_long)
    # ...and a short input afterwards is again exactly the unscaled RoPE
    assert torch.equal(logits_of(model, short_ids), none_short)
    # and a long input again is what it was the first time (no state leaks)
    fresh = make_model(make_config(family))
    rope_ntk.patch(fresh, "dynamic-ntk", factor=4)
    assert torch.equal(logits_of(model, long_ids), logits_of(fresh, long_ids))


def test_dynamic_ntk_explicit_original_length(llama, long_ids):
    """original_max_position_embeddings=100 moves the switch point from 64 to 100."""
    none = make_model(make_config("llama"))
    rope_ntk.patch(none, "none")
    rope_ntk.patch(llama, "dynamic-ntk", factor=2, original_max_position_embeddings=100)
    assert rope_ntk.describe(llama)[0]["original_max_position_embeddings"] == 100
    assert torch.equal(logits_of(llama, long_ids[:, :100]), logits_of(none, long_ids[:, :100]))
    assert visibly_different(logits_of(llama, long_ids[:, :101]), logits_of(none, long_ids[:, :101]))


# ---------------------------------------------------------------- cached generation


@pytest.mark.parametrize("method,params", STATIC, ids=[m for m, _ in STATIC])
def test_cached_generation_matches_full_forward(model, method, params):
    prompt = token_ids(40, seed=7)
    rope_ntk.patch(model, method, **params)
    new = LONG - prompt.shape[1]
    # explicit mask: generate would otherwise infer one from pad_token_id and mask those ids
    settings = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (1, LONG)  # runs past the original context of 64
    assert torch.equal(cached, uncached)

    # an incremental decode with past_key_values gives the full forward's logits
    # (transformers 5.x renames past_key_values to cache; take whichever this version has)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    sequence = cached
    with torch.no_grad():
        out = model(input_ids=sequence[:, :40], use_cache=True)
        steps, past = [out.logits], getattr(out, cache_arg)
        assert past is not None
        for t in range(40, LONG):
            out = model(input_ids=sequence[:, t : t + 1], use_cache=True, **{cache_arg: past})
            steps.append(out.logits)
            past = getattr(out, cache_arg)
        assert past.get_seq_length() == LONG
    incremental = torch.cat(steps, dim=1)
    full = logits_of(model, sequence)
    assert_logits_close(incremental, full, rtol=1e-4)
    # and greedy decoding picked the argmax of the full forward at every new position
    assert torch.equal(full[0, 39:-1].argmax(-1), sequence[0, 40:])


# ---------------------------------------------------------------- bf16


def _reference_inv_freq(method: str, factor: float) -> np.ndarray:
    if method == "linear":
        return ref_default(10_000.0, 16) / factor
    return ref_yarn(10_000.0, 16, factor, ORIGINAL)[0]


@pytest.mark.parametrize("cast", ["to_dtype", "model.to", "to_dtype-then-patch"])
@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_bf16_keeps_rotary_float32(model, method, cast, long_ids):
    factor = 4.0
    if cast == "to_dtype-then-patch":
        rope_ntk.to_dtype(model, torch.bfloat16)
    rope_ntk.patch(model, method, factor=factor)
    if cast == "to_dtype":
        assert rope_ntk.to_dtype(model, torch.bfloat16) is model
    elif cast == "model.to":
        model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    module = rotary(model)
    assert module.inv_freq.dtype == torch.float32
    assert module.default_inv_freq.dtype == torch.float32
    # float64 closed form, cast once to float32
    inv32 = torch.from_numpy(_reference_inv_freq(method, factor)).to(torch.float32)
    assert torch.equal(module.inv_freq, inv32)
    assert torch.equal(module.default_inv_freq, torch.from_numpy(ref_default(10_000.0, 16)).to(torch.float32))

    scale = 0.1 * math.log(factor) + 1 if method == "yarn" else 1.0
    positions = torch.arange(0, 131_073)[None]  # up to 131072 = 2**17
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    cos, sin = module(x, positions)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 131_073, 16)
    angles = positions[..., None].to(torch.float32) * inv32
    emb = torch.cat((angles, angles), dim=-1)
    want_cos, want_sin = (emb.cos() * scale).to(torch.bfloat16), (emb.sin() * scale).to(torch.bfloat16)
    assert torch.equal(cos, want_cos)
    assert torch.equal(sin, want_sin)
    # what this guards against: angles formed in bfloat16 are visibly wrong up there
    naive = (positions[..., None].to(torch.bfloat16) * inv32.to(torch.bfloat16)).float()
    naive_cos = (torch.cat((naive, naive), dim=-1).cos() * scale).to(torch.bfloat16)
    assert (naive_cos[0, -1000:].float() - want_cos[0, -1000:].float()).abs().max() > 0.1

    # the bf16 model still runs past the original context
    logits = logits_of(model, long_ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_float32_cos_sin_are_the_closed_form(llama, method):
    """cos/sin of the patched module, float32, against the float64 closed form cast to float32 once."""
    factor = 4.0
    rope_ntk.patch(llama, method, factor=factor)
    inv32 = torch.from_numpy(_reference_inv_freq(method, factor)).to(torch.float32)
    scale = 0.1 * math.log(factor) + 1 if method == "yarn" else 1.0
    positions = torch.arange(0, 4 * LONG)[None]
    cos, sin = rotary(llama)(torch.zeros(1, 1), positions)
    angles = positions[..., None].to(torch.float32) * inv32
    emb = torch.cat((angles, angles), dim=-1)
    assert torch.equal(cos, emb.cos() * scale)
    assert torch.equal(sin, emb.sin() * scale)


def test_to_dtype_keeps_stock_rotary_float32(llama):
    stock_inv = rotary(llama).inv_freq.clone()
    rope_ntk.to_dtype(llama, torch.bfloat16)
    assert llama.model.embed_tokens.weight.dtype == torch.bfloat16
    assert rotary(llama).inv_freq.dtype == torch.float32
    assert torch.equal(rotary(llama).inv_freq, stock_inv)
