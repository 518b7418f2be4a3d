"""Parity with transformers' own RoPE scaling (``rope_type`` linear / dynamic / yarn).

Two levels:

* frequencies: ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[...]``
  against ``rope_ntk.methods.frequencies`` and the patched module's buffers,
  to 1e-6 relative (transformers computes in float32);
* logits: a tiny model patched by rope_ntk against the same weights in a
  model built with the native ``rope_parameters``, on 150 tokens (original
  context 64), to 1e-5 relative, for Llama, Mistral and Qwen2.

transformers' ``dynamic`` measures the length against
``config.max_position_embeddings``, so the configs here keep that equal to the
original context.
"""

from __future__ import annotations

import pytest
import torch
from tiny import LONG, ORIGINAL, logits_of, make_config, make_model, rope_dict
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import rope_ntk
from rope_ntk import methods

FREQ_RTOL = 1e-6
LOGIT_RTOL = 1e-5

# our method name -> transformers rope_type
HF_TYPE = {"linear": "linear", "dynamic-ntk": "dynamic", "yarn": "yarn"}

# (rope_theta, head_dim, partial_rotary_factor, original context L)
SHAPES = [
    (10_000.0, 16, 1.0, ORIGINAL),
    (100_000.0, 64, 1.0, 8192),  # SmolLM2-like
    (500_000.0, 128, 1.0, 4096),
    (10_000.0, 128, 0.25, 2048),  # partial rotary: 32 channels rotated
    (10_000.0, 128, 1.0, 131_072),  # every pair turns > once in L: YaRN's ramp bound is clamped
]
SHAPE_IDS = [f"theta{int(t)}-hd{h}-p{p:g}-L{L}" for t, h, p, L in SHAPES]

# method parameters to compare; keys are ours (and transformers', they coincide)
CASES = [
    ("linear", {"factor": 2.0}),
    ("linear", {"factor": 5.5}),
    ("dynamic-ntk", {"factor": 2.0}),
    ("dynamic-ntk", {"factor": 4.0}),
    ("yarn", {"factor": 2.0}),
    ("yarn", {"factor": 4.0}),
    ("yarn", {"factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0}),
    ("yarn", {"factor": 4.0, "truncate": False}),
    ("yarn", {"factor": 4.0, "attention_factor": 1.25}),
]
CASE_IDS = [f"{m}-" + "-".join(f"{k}{v}" for k, v in p.items()) for m, p in CASES]


def hf_config(theta, head_dim, partial, L, rope_type="default", **scaling):
    """A (never instantiated) Llama config carrying a native rope_parameters."""
    rope = {"rope_type": rope_type, "rope_theta": theta, **scaling}
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    if rope_type in ("yarn", "llama3"):  # transformers 4.x requires it for llama3
        rope["original_max_position_embeddings"] = L
    heads = 2
    return make_config(
        "llama",
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=L,
        rope_parameters=rope,
    )


def hf_rope(config) -> dict:
    """The config's RoPE dict, 5.x rope_parameters or 4.x rope_scaling, as transformers' functions read it.

    On 4.x this is the live ``config.rope_scaling`` (so tests may add keys to it).
    """
    if isinstance(getattr(config, "rope_parameters", None), dict):
        return config.rope_parameters
    if getattr(config, "rope_scaling", None) is None:
        config.rope_scaling = {"rope_type": "default"}
    return config.rope_scaling


def hf_frequencies(config, seq_len=None):
    rope = hf_rope(config)
    # 4.x configs may spell the type "type" only; transformers 4.x reads either
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return LlamaRotaryEmbedding(config).inv_freq, 1.0
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return inv_freq, attention_factor


def assert_freqs_close(ours: torch.Tensor, theirs: torch.Tensor):
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=FREQ_RTOL, atol=0.0)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor):
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=LOGIT_RTOL, atol=LOGIT_RTOL * scale)


# ---------------------------------------------------------------- frequencies


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("theta,head_dim,partial,L", SHAPES, ids=SHAPE_IDS)
def test_frequencies_match_transformers(method, params, theta, head_dim, partial, L):
    config = hf_config(theta, head_dim, partial, L, HF_TYPE[method], **params)
    rope = methods.ModelRope(theta, int(head_dim * partial), L)
    resolved = methods.validate_params(method, params)
    lengths = [None] if method != "dynamic-ntk" else [L + 1, 3 * L // 2, 2 * L, 5 * L]
    for seq_len in lengths:
        theirs, their_factor = hf_frequencies(config, seq_len)
        ours = methods.frequencies(method, resolved, rope, seq_len)
        assert_freqs_close(ours.inv_freq, theirs)
        assert ours.attention_factor == pytest.approx(their_factor, rel=1e-12)
    # the comparison is not vacuous: scaled frequencies differ from the default ones
    default = methods.frequencies("none", {}, rope).inv_freq
    assert not torch.allclose(ours.inv_freq, default, rtol=1e-3)


@pytest.mark.parametrize("theta,head_dim,partial,L", SHAPES, ids=SHAPE_IDS)
def test_dynamic_at_or_below_original_length_matches_transformers_default(theta, head_dim, partial, L):
    config = hf_config(theta, head_dim, partial, L, "dynamic", factor=4.0)
    rope = methods.ModelRope(theta, int(head_dim * partial), L)
    resolved = methods.validate_params("dynamic-ntk", {"factor": 4.0})
    for seq_len in (1, L // 2, L):
        theirs, _ = hf_frequencies(config, seq_len)
        assert_freqs_close(methods.frequencies("dynamic-ntk", resolved, rope, seq_len).inv_freq, theirs)


# ---------------------------------------------------------------- patched module buffers


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
def test_patched_module_buffers_match_transformers(family, method, params):
    theta = 1_000.0
    stock = make_model(make_config(family, rope_parameters={"rope_type": "default", "rope_theta": theta}))
    native_config = make_config(
        family, rope_parameters={"rope_type": HF_TYPE[method], "rope_theta": theta, **params}
    )
    rope_ntk.patch(stock, method, **params)
    (name, module), = rope_ntk.find_rotary_modules(stock)
    assert isinstance(module, rope_ntk.ScaledRotaryEmbedding)
    assert module.inv_freq.dtype == torch.float32
    if method == "dynamic-ntk":
        for seq_len in (ORIGINAL + 1, LONG, 4 * ORIGINAL):
            theirs, their_factor = hf_frequencies(native_config, seq_len)
            ours, our_factor = module.frequencies_for(seq_len)
            assert_freqs_close(ours, theirs)
            assert our_factor == their_factor
    else:
        theirs, their_factor = hf_frequencies(native_config)
        assert_freqs_close(module.inv_freq, theirs)
        assert module.attention_scaling == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize(
    "method,params",
    [("linear", {"factor": 3.0}), ("yarn", {"factor": 4.0, "beta_fast": 16.0}), ("dynamic-ntk", {"factor": 2.0})],
)
def test_recorded_config_reproduces_the_patch_in_transformers(llama, method, params):
    """model.config.rope_parameters after a patch, fed to transformers, gives the patched frequencies."""
    rope_ntk.patch(llama, method, **params)
    (_, module), = rope_ntk.find_rotary_modules(llama)
    seq_len = LONG if method == "dynamic-ntk" else None
    theirs, their_factor = hf_frequencies(llama.config, seq_len)
    ours, our_factor = module.frequencies_for(seq_len or 0)
    assert_freqs_close(ours, theirs)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)


def test_recorded_ntk_config_is_default_rope_with_larger_base(llama):
    """Static NTK is recorded as the default RoPE with base * alpha**(d/(d-2))."""
    alpha = 3.0
    rope_ntk.patch(llama, "ntk", alpha=alpha)
    recorded = rope_dict(llama.config)
    assert recorded["rope_type"] == "default"
    dim = llama.config.head_dim
    assert recorded["rope_theta"] == pytest.approx(10_000.0 * alpha ** (dim / (dim - 2)), rel=1e-12)
    theirs, their_factor = hf_frequencies(llama.config)
    assert_freqs_close(llama.model.rotary_emb.inv_freq, theirs)
    assert llama.model.rotary_emb.attention_scaling == their_factor == 1.0


# ---------------------------------------------------------------- logits


THETA = {"llama": 10_000.0, "mistral": 1_000_000.0, "qwen2": 500.0}


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", {"factor": 2.0}),
        ("linear", {"factor": 4.0}),
        ("dynamic-ntk", {"factor": 2.0}),
        ("dynamic-ntk", {"factor": 4.0}),
        ("yarn", {"factor": 2.0}),
        ("yarn", {"factor": 4.0}),
        ("yarn", {"factor": 4.0, "beta_fast": 8.0, "beta_slow": 0.5, "truncate": False}),
    ],
)
def test_logits_match_native_transformers(family, method, params, long_ids):
    theta = THETA[family]
    stock = make_model(make_config(family, rope_parameters={"rope_type": "default", "rope_theta": theta}))
    native = make_model(
        make_config(family, rope_parameters={"rope_type": HF_TYPE[method], "rope_theta": theta, **params}), seed=123
    )
    missing, unexpected = native.load_state_dict(stock.state_dict(), strict=True)
    assert not missing and not unexpected

    unscaled = logits_of(stock, long_ids)
    theirs = logits_of(native, long_ids)
    # the comparison can fail: the native scaled model is far from the unscaled one
    assert (theirs - unscaled).abs().max() > 100 * LOGIT_RTOL * theirs.abs().max()

    rope_ntk.patch(stock, method, cache_consistent=False, **params)  # transformers' semantics
    ours = logits_of(stock, long_ids)
    assert_logits_close(ours, theirs)


@pytest.mark.parametrize(
    "method,params", [("linear", {"factor": 2.0}), ("dynamic-ntk", {"factor": 3.0}), ("yarn", {"factor": 4.0})]
)
@pytest.mark.parametrize("family,partial", [("phi", 0.5), ("gpt_neox", 0.25)])
def test_partial_rotary_logits_match_native_transformers(family, partial, method, params, long_ids):
    """Families that rotate only part of each head: the rotated width comes from partial_rotary_factor."""
    sizes = dict(num_key_value_heads=4)
    rope = {"rope_theta": 1_000.0, "partial_rotary_factor": partial}
    stock = make_model(make_config(family, **sizes, rope_parameters={"rope_type": "default", **rope}))
    native = make_model(
        make_config(family, **sizes, rope_parameters={"rope_type": HF_TYPE[method], **rope, **params}), seed=123
    )
    native.load_state_dict(stock.state_dict(), strict=True)
    unscaled, theirs = logits_of(stock, long_ids), logits_of(native, long_ids)
    assert (theirs - unscaled).abs().max() > 100 * LOGIT_RTOL * theirs.abs().max()

    rope_ntk.patch(stock, method, cache_consistent=False, **params)  # transformers' semantics
    (entry,) = rope_ntk.describe(stock)
    assert entry["dim"] == int(16 * partial)
    assert_logits_close(logits_of(stock, long_ids), theirs)


@pytest.mark.parametrize("method,params", [("dynamic-ntk", {"factor": 2.0}), ("yarn", {"factor": 4.0})])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_explicit_head_dim_logits_match_native_transformers(family, method, params, long_ids):
    """head_dim = 32 while hidden_size / heads = 16: the rotated width is head_dim."""
    sizes = dict(head_dim=32)
    stock = make_model(make_config(family, **sizes))
    native = make_model(
        make_config(family, **sizes, rope_parameters={"rope_type": HF_TYPE[method], "rope_theta": 10_000.0, **params}),
        seed=123,
    )
    native.load_state_dict(stock.state_dict(), strict=True)
    theirs = logits_of(native, long_ids)
    rope_ntk.patch(stock, method, cache_consistent=False, **params)  # transformers' semantics
    assert rope_ntk.describe(stock)[0]["dim"] == 32
    assert_logits_close(logits_of(stock, long_ids), theirs)
