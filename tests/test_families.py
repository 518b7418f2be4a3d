"""Every family in rope_ntk/families.py, on a tiny random model (tests/tiny.py FAMILY_SIZES).

For each family and each method transformers has natively (linear, dynamic,
yarn, llama3, longrope): the patched model's logits on 150 tokens (original
context 64) equal those of the same weights built with the native
``rope_parameters``, to 1e-5 relative in float32. GPT-J, which has no native
scaling, is checked against its own module fed a table built from the
float64 references. Family quirks checked on the way: partial rotary,
interleaved and (sin, cos) layouts, Gemma 3's per-layer-type RoPE,
DeepSeek-V3's softmax scale.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference import ref_default, ref_yarn
from test_parity_transformers import assert_logits_close
from tiny import FAMILY_SIZES, LONG, ORIGINAL, logits_of, make_family_config, make_model

import rope_ntk
from rope_ntk import families, patching

NATIVE_FAMILIES = [f for f in FAMILY_SIZES if families.FAMILIES[f].native]
LOGIT_RTOL = 1e-5


def longrope_lists(pairs: int) -> dict:
    short = [1.0 + 0.05 * i / pairs for i in range(pairs)]
    long = [1.0 + 7.0 * i / max(pairs - 1, 1) for i in range(pairs)]
    return {"short_factor": short, "long_factor": long, "factor": 4.0}


# (rope_ntk method, transformers rope_type, parameters or a function of the rotated pairs)
NATIVE_CASES = [
    ("linear", "linear", {"factor": 2.0}),
    ("dynamic-ntk", "dynamic", {"factor": 2.0}),
    ("yarn", "yarn", {"factor": 4.0}),
    ("llama3", "llama3", {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("longrope", "longrope", longrope_lists),
]


def rotated_pairs(model) -> int:
    (_, module), = rope_ntk.find_rotary_modules(model)
    layer_type = "full_attention" if families.family_of(model).per_layer_type else None
    return patching.model_rope(model, module, layer_type=layer_type).dim // 2


def scaled_rope_parameters(config, rope_type: str, params: dict, layer_types=("full_attention",)) -> dict:
    """The config's own rope_parameters with the scaling put in (per layer type where nested)."""
    rope = copy.deepcopy(config.rope_parameters)
    if families.FAMILIES[config.model_type].per_layer_type:
        for layer_type in layer_types:
            rope[layer_type] = {**rope[layer_type], "rope_type": rope_type, **params}
        return rope
    return {**rope, "rope_type": rope_type, **params}


def stock_and_native(model_type: str, rope_type: str, params: dict, **native_extra):
    stock = make_model(make_family_config(model_type))
    rope = scaled_rope_parameters(stock.config, rope_type, params, **native_extra)
    native = make_model(make_family_config(model_type, rope_parameters=rope), seed=123)
    missing, unexpected = native.load_state_dict(stock.state_dict(), strict=True)
    assert not missing and not unexpected
    return stock, native


@pytest.mark.parametrize("method,rope_type,params", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
@pytest.mark.parametrize("model_type", NATIVE_FAMILIES)
def test_patched_logits_equal_native(model_type, method, rope_type, params, long_ids):
    if callable(params):
        params = params(rotated_pairs(make_model(make_family_config(model_type))))
    accepted = families.FAMILIES[model_type].native_rope_types
    if accepted is not None and rope_type not in accepted:
        # transformers refuses this rope_type for the family: patching works, recorded as not native
        model = make_model(make_family_config(model_type))
        before = copy.deepcopy(model.config.rope_parameters)
        rope_ntk.patch(model, method, **params)
        assert model.config.rope_ntk["native"] is False
        assert model.config.rope_parameters == before
        assert rope_ntk.describe(model)[0]["method"] == method
        return
    stock, native = stock_and_native(model_type, rope_type, params)
    unscaled, theirs = logits_of(stock, long_ids), logits_of(native, long_ids)
    # the comparison can fail: the native scaled model is far from the unscaled one
    assert (theirs - unscaled).abs().max() > 100 * LOGIT_RTOL * theirs.abs().max()

    handle = rope_ntk.patch(stock, method, **params)
    assert_logits_close(logits_of(stock, long_ids), theirs)
    # describe names what was touched, with the method and the family's layout
    touched = rope_ntk.describe(stock)
    assert {e["module"] for e in touched} == set(handle.modules) and len(handle.modules) == 1
    layout = families.FAMILIES[model_type].layout
    assert all(e["class"] == "ScaledRotaryEmbedding" and e["layout"] == layout for e in touched)
    scaled = [e for e in touched if e["method"] == method]
    assert len(scaled) == 1  # Gemma 3: the global layers only

    rope_ntk.unpatch(stock)
    assert torch.equal(logits_of(stock, long_ids), unscaled)


# ---------------------------------------------------------------- GPT-J


def gptj_table(inv_freq: np.ndarray, positions: int, attention_factor: float) -> torch.Tensor:
    """GPT-J's own buffer format: [positions, sin half | cos half], from float64 frequencies."""
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq).astype(np.float32).astype(np.float64)
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1) * attention_factor
    return torch.from_numpy(table).float()


@pytest.mark.parametrize("method,params", [("none", {}), ("linear", {"factor": 2.0}), ("yarn", {"factor": 4.0})])
def test_gptj_matches_its_own_module_with_a_reference_table(method, params, long_ids):
    """GPT-J pairs channels (2i, 2i+1) and reads a (sin, cos) table; no native scaling exists."""
    reference = make_model(make_family_config("gptj"))
    dim = reference.config.rotary_dim
    inv, factor = ref_default(10_000.0, dim), 1.0
    if method == "linear":
        inv = inv / params["factor"]
    elif method == "yarn":
        inv, factor = ref_yarn(10_000.0, dim, params["factor"], ORIGINAL)
    # the stock table stops at max_position_embeddings: give the reference module one long enough
    reference.transformer.rotary_emb.embed_positions = gptj_table(inv, LONG, factor)
    theirs = logits_of(reference, long_ids)

    patched = make_model(make_family_config("gptj"))
    rope_ntk.patch(patched, method, **params)
    (entry,) = rope_ntk.describe(patched)
    assert (entry["module"], entry["layout"], entry["dim"]) == ("transformer.rotary_emb", "sin-cos", dim)
    assert_logits_close(logits_of(patched, long_ids), theirs)
    assert patched.config.rope_ntk["native"] is False  # transformers' GPT-J cannot express it


# ---------------------------------------------------------------- Gemma 3


def test_gemma3_local_layers_keep_their_own_base(long_ids):
    stock, native = stock_and_native("gemma3_text", "yarn", {"factor": 4.0})
    rope_ntk.patch(stock, "yarn", factor=4.0)
    by_type = {e["layer_type"]: e for e in rope_ntk.describe(stock)}
    assert by_type["sliding_attention"]["method"] == "none"
    assert by_type["sliding_attention"]["rope_theta"] == 10_000.0  # the local base, not the global one
    assert by_type["full_attention"]["method"] == "yarn"
    assert by_type["full_attention"]["rope_theta"] == 1_000_000.0
    assert by_type["full_attention"]["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    assert stock.config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert stock.config.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert_logits_close(logits_of(stock, long_ids), logits_of(native, long_ids))


def test_gemma3_scaling_every_layer_type_on_request(long_ids):
    both = ("sliding_attention", "full_attention")
    stock, native = stock_and_native("gemma3_text", "linear", {"factor": 2.0}, layer_types=both)
    rope_ntk.patch(stock, "linear", factor=2.0, layer_types=list(both))
    assert {e["method"] for e in rope_ntk.describe(stock)} == {"linear"}
    assert_logits_close(logits_of(stock, long_ids), logits_of(native, long_ids))
    with pytest.raises(rope_ntk.InvalidParameterError, match=r"layer_types=\['global'\].*valid: full_attention"):
        rope_ntk.patch(stock, "linear", factor=2.0, layer_types=["global"])


def test_layer_types_refused_for_one_rope_families(llama):
    with pytest.raises(rope_ntk.InvalidParameterError, match=r"layer_types=\['full_attention'\].*Llama"):
        rope_ntk.patch(llama, "yarn", factor=2, layer_types=["full_attention"])
    assert not rope_ntk.is_patched(llama)


# ---------------------------------------------------------------- DeepSeek-V3


@pytest.mark.parametrize("params", [{"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5},
                                    {"factor": 4.0, "mscale": 0.8, "mscale_all_dim": 0.8}])
def test_deepseek_v3_softmax_scale_follows_mscale_all_dim(params, long_ids):
    stock, native = stock_and_native("deepseek_v3", "yarn", params)
    attention = stock.model.layers[0].self_attn
    before = attention.scaling
    rope_ntk.patch(stock, "yarn", **params)
    qk = stock.config.qk_head_dim
    want = qk**-0.5 * (0.1 * params["mscale_all_dim"] * math.log(params["factor"]) + 1) ** 2
    assert attention.scaling == pytest.approx(want, rel=1e-12)
    assert attention.scaling == pytest.approx(native.model.layers[0].self_attn.scaling, rel=1e-12)
    assert_logits_close(logits_of(stock, long_ids), logits_of(native, long_ids))
    rope_ntk.unpatch(stock)
    assert attention.scaling == before


def test_deepseek_v3_refuses_dynamic_mscale_all_dim():
    model = make_model(make_family_config("deepseek_v3"))
    with pytest.raises(rope_ntk.InvalidParameterError, match=r"mscale_all_dim=0.5 for method 'dynamic-yarn'"):
        rope_ntk.patch(model, "dynamic-yarn", mscale_all_dim=0.5)
    assert not rope_ntk.is_patched(model)
