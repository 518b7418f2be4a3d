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
from tiny import FAMILY_SIZES, LONG, ORIGINAL, TRANSFORMERS_4, logits_of, make_family_config, make_model, rope_dict

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
    # original_max_position_embeddings: transformers 4.x requires it for llama3 (5.x fills it in)
    ("llama3", "llama3", {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": ORIGINAL}),
    ("longrope", "longrope", longrope_lists),
]


def rotated_pairs(model) -> int:
    """Frequency pairs of the model's own (global) rotary module, read off its buffer."""
    module = rope_ntk.find_rotary_modules(model)[0][1]
    own = getattr(module, "full_attention_inv_freq", None)  # Gemma 3 on 5.x: one buffer per layer type
    return (own if own is not None else module.inv_freq).numel()


def scaled_rope_parameters(config, rope_type: str, params: dict, layer_types=("full_attention",)) -> dict:
    """The config's own rope_parameters with the scaling put in (per layer type where nested)."""
    rope = rope_dict(config)
    if families.FAMILIES[config.model_type].per_layer_type:
        for layer_type in layer_types:
            rope[layer_type] = {**rope[layer_type], "rope_type": rope_type, **params}
        return rope
    return {**rope, "rope_type": rope_type, **params}


def family_sizes_for(model_type: str, rope_type: str, params: dict) -> dict:
    """Config overrides a family needs for ``rope_type`` on the installed transformers."""
    if TRANSFORMERS_4 and model_type == "phi3" and rope_type == "longrope":
        # Phi-3's 4.x config has no longrope factor: it is max_position_embeddings / original
        return {"max_position_embeddings": int(params["factor"] * ORIGINAL)}
    return {}


def stock_and_native(model_type: str, rope_type: str, params: dict, **native_extra):
    sizes = family_sizes_for(model_type, rope_type, params)
    stock = make_model(make_family_config(model_type, **sizes))
    rope = scaled_rope_parameters(stock.config, rope_type, params, **native_extra)
    native = make_model(make_family_config(model_type, rope_parameters=rope, **sizes), seed=123)
    missing, unexpected = native.load_state_dict(stock.state_dict(), strict=True)
    assert not missing and not unexpected
    return stock, native


@pytest.mark.parametrize("method,rope_type,params", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
@pytest.mark.parametrize("model_type", NATIVE_FAMILIES)
def test_patched_logits_equal_native(model_type, method, rope_type, params, long_ids):
    if callable(params):
        params = params(rotated_pairs(make_model(make_family_config(model_type))))
    accepted = families.FAMILIES[model_type].accepted_rope_types(TRANSFORMERS_4)
    if accepted is not None and rope_type not in accepted:
        # transformers refuses this rope_type for the family: patching works, recorded as not native
        model = make_model(make_family_config(model_type))
        before = rope_dict(model.config)
        rope_ntk.patch(model, method, **params)
        assert model.config.rope_ntk["native"] is False
        assert rope_dict(model.config) == before
        # every rotary module runs the method, none was left behind
        assert [e["method"] for e in rope_ntk.describe(model)] == [method] * len(rope_ntk.find_rotary_modules(model))
        return
    stock, native = stock_and_native(model_type, rope_type, params)
    # every rotary module the stock model has (transformers 4.x keeps extra per-layer ones for
    # Qwen2-MoE, StableLM and Persimmon, and Gemma 3's local RoPE in its own module)
    rotary = [n for n, m in stock.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    unscaled, theirs = logits_of(stock, long_ids), logits_of(native, long_ids)
    # the comparison can fail: the native scaled model is far from the unscaled one
    assert (theirs - unscaled).abs().max() > 100 * LOGIT_RTOL * theirs.abs().max()

    # transformers scales every token for the whole input length: rope_ntk's legacy mode
    handle = rope_ntk.patch(stock, method, cache_consistent=False, **params)
    assert_logits_close(logits_of(stock, long_ids), theirs)
    # describe names what was touched, with the method and the family's layout
    touched = rope_ntk.describe(stock)
    assert handle.modules == rotary and {e["module"] for e in touched} == set(rotary)
    layout = families.FAMILIES[model_type].layout
    assert all(e["class"] == "ScaledRotaryEmbedding" and e["layout"] == layout for e in touched)
    # every entry is scaled, except Gemma 3's local layers, which keep the unscaled RoPE
    want = ["none" if e.get("layer_type") == "sliding_attention" else method for e in touched]
    assert [e["method"] for e in touched] == want
    assert sum(e.get("layer_type") == "sliding_attention" for e in touched) == (model_type == "gemma3_text")

    rope_ntk.unpatch(stock)
    assert torch.equal(logits_of(stock, long_ids), unscaled)


# ---------------------------------------------------------------- GPT-J


def gptj_table(inv_freq: np.ndarray, positions: int, attention_factor: float) -> torch.Tensor:
    """GPT-J's own buffer format: [positions, sin half | cos half], from float64 frequencies."""
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq).astype(np.float32).astype(np.float64)
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1) * attention_factor
    return torch.from_numpy(table).float()


GPTJ_4X = ("transformers 4.x's GPT-J has no rotary module: each attention layer keeps its own sin/cos table "
           "(GPTJAttention.embed_positions), which rope_ntk does not patch")


def test_gptj_in_transformers_4_is_refused_naming_the_family():
    if not TRANSFORMERS_4:
        pytest.skip("transformers 5.x's GPT-J has a rotary module (tests below)")
    model = make_model(make_family_config("gptj"))
    with pytest.raises(rope_ntk.UnsupportedModelError, match=r"^GPT-J \(gptj\): GPTJForCausalLM has no rotary"):
        rope_ntk.patch(model, "yarn", factor=2.0)
    assert not rope_ntk.is_patched(model)


@pytest.mark.parametrize("method,params", [("none", {}), ("linear", {"factor": 2.0}), ("yarn", {"factor": 4.0})])
def test_gptj_matches_its_own_module_with_a_reference_table(method, params, long_ids):
    """GPT-J pairs channels (2i, 2i+1) and reads a (sin, cos) table; no native scaling exists."""
    if TRANSFORMERS_4:
        pytest.skip(GPTJ_4X)
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
    recorded = rope_dict(stock.config)
    assert recorded["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert recorded["full_attention"]["rope_type"] == "yarn"
    assert_logits_close(logits_of(stock, long_ids), logits_of(native, long_ids))


def test_gemma3_scaling_every_layer_type_on_request(long_ids):
    if TRANSFORMERS_4:
        pytest.skip("transformers 4.x builds Gemma 3's local RoPE (model.rotary_emb_local) as the default RoPE "
                    "whatever the config says, so no native model scales the local layers to compare with")
    both = ("sliding_attention", "full_attention")
    stock, native = stock_and_native("gemma3_text", "linear", {"factor": 2.0}, layer_types=both)
    rope_ntk.patch(stock, "linear", factor=2.0, layer_types=list(both))
    assert [e["method"] for e in rope_ntk.describe(stock)] == ["linear", "linear"]
    assert stock.config.rope_ntk["native"] is True
    assert_logits_close(logits_of(stock, long_ids), logits_of(native, long_ids))


def test_gemma3_local_layers_scaled_on_request_are_not_native_in_transformers_4():
    """4.x cannot express scaled local layers: the patch runs, and is recorded for rope_ntk to reapply."""
    if not TRANSFORMERS_4:
        pytest.skip("transformers 5.x expresses scaled local layers natively (test above)")
    model = make_model(make_family_config("gemma3_text"))
    before = rope_dict(model.config)
    rope_ntk.patch(model, "linear", factor=2.0, layer_types=["sliding_attention", "full_attention"])
    by_type = {e["layer_type"]: e for e in rope_ntk.describe(model)}
    assert {t: e["method"] for t, e in by_type.items()} == {"sliding_attention": "linear", "full_attention": "linear"}
    assert by_type["sliding_attention"]["rope_theta"] == 10_000.0
    assert model.config.rope_ntk["native"] is False
    assert rope_dict(model.config) == before


def test_gemma3_layer_types_must_exist():
    model = make_model(make_family_config("gemma3_text"))
    with pytest.raises(rope_ntk.InvalidParameterError, match=r"layer_types=\['global'\].*valid: full_attention"):
        rope_ntk.patch(model, "linear", factor=2.0, layer_types=["global"])
    assert not rope_ntk.is_patched(model)


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
