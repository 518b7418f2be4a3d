"""``rope_ntk.verify``: the rotary modules a model calls carry the RoPE its
config records, after every way of getting a model: a fresh load, a patch
after load, after a dtype cast, after meta-device init or ``device_map``,
and a reload of a saved patched model. Negative cases show it fails, and
names the module, when what runs is not what is configured."""

from __future__ import annotations

import math

import pytest
import torch
from test_families import longrope_lists
from tiny import FAMILY_SIZES, make_config, make_family_config, make_model
from transformers import AutoModelForCausalLM

import rope_ntk
from rope_ntk import RopeMismatchError, formulas

HEAD_DIM = 16  # tiny.TINY: hidden 64 / 4 heads
BASE = 10000.0  # Llama's default rope_theta

PARAMS = {
    "none": {},
    "linear": {"factor": 2.0},
    "ntk": {"alpha": 3.0},
    "dynamic-ntk": {"factor": 2.0},
    "ntk-by-parts": {"factor": 4.0},
    "yarn": {"factor": 4.0},
    "dynamic-yarn": {"factor": 4.0},
    "llama3": {"factor": 4.0},
    "longrope": longrope_lists(HEAD_DIM // 2),
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from evalkit import save_tiny_lm

    return str(save_tiny_lm(tmp_path_factory.mktemp("verify") / "lm"))


def _single(report):
    (check,) = report.checks
    return check


def test_fresh_model_is_the_default_rope():
    model = make_model(make_config("llama"))
    report = rope_ntk.verify(model)
    check = _single(report)
    assert report.ok and report.source == "config.rope_parameters"
    assert (check.module, check.method, check.called) == ("model.rotary_emb", "none", True)
    assert check.inv_freq_error <= 1e-6


def test_fresh_model_with_a_native_scaling_config():
    """transformers' own yarn module against the formula computed from the config."""
    rope = {"rope_type": "yarn", "rope_theta": BASE, "factor": 4.0, "original_max_position_embeddings": 16}
    report = rope_ntk.verify(make_model(make_config("llama", rope_parameters=rope)))
    check = _single(report)
    assert check.method == "yarn"
    assert check.expected_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1, rel=1e-12)
    assert check.attention_factor == pytest.approx(check.expected_attention_factor, rel=1e-6)


@pytest.mark.parametrize("method", PARAMS)
def test_patch_after_load(tiny_lm, method):
    model, _ = rope_ntk.load_model(tiny_lm)
    assert _single(rope_ntk.verify(model)).method == "none"  # fresh load
    pairs = model.model.rotary_emb.inv_freq.numel()
    rope_ntk.patch(model, method, **(longrope_lists(pairs) if method == "longrope" else PARAMS[method]))
    check = _single(rope_ntk.verify(model))
    assert check.method == method and check.called
    assert check.inv_freq_error <= 1e-6


def test_expected_frequencies_are_the_closed_forms():
    """What verify compares against, checked once against formulas written out here."""
    model = make_model(make_config("llama"))
    pairs = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    default = BASE ** (-2 * pairs / HEAD_DIM)
    rope_ntk.patch(model, "linear", factor=2.0)
    assert torch.allclose(model.model.rotary_emb.inv_freq.double(), default / 2, rtol=1e-7)
    rope_ntk.verify(model)
    rope_ntk.patch(model, "ntk", alpha=3.0)
    ntk = (BASE * 3.0 ** (HEAD_DIM / (HEAD_DIM - 2))) ** (-2 * pairs / HEAD_DIM)
    assert torch.allclose(model.model.rotary_emb.inv_freq.double(), ntk, rtol=1e-7)
    rope_ntk.verify(model)


@pytest.mark.parametrize("order", ["cast-then-patch", "patch-then-cast"])
def test_patch_and_bfloat16(order):
    model = make_model(make_config("llama"))
    if order == "cast-then-patch":
        model.to(torch.bfloat16)
        rope_ntk.patch(model, "yarn", factor=4.0)
    else:
        rope_ntk.patch(model, "yarn", factor=4.0)
        model.to(torch.bfloat16)
    check = _single(rope_ntk.verify(model))
    assert check.inv_freq_error <= 1e-6  # the buffers stay float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_plain_bfloat16_cast_of_a_stock_model_is_caught_and_to_dtype_is_not():
    """``model.to(bfloat16)`` rounds transformers' own inv_freq to 8 bits: verify says so."""
    model = make_model(make_config("llama"))
    model.to(torch.bfloat16)
    with pytest.raises(RopeMismatchError, match=r"'model.rotary_emb'.*inv_freq"):
        rope_ntk.verify(model)
    kept = rope_ntk.to_dtype(make_model(make_config("llama")), torch.bfloat16)
    assert rope_ntk.verify(kept).ok


def test_patch_on_a_meta_device_model_then_materialize():
    reference = make_model(make_config("llama"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config("llama"))
    rope_ntk.patch(model, "yarn", factor=4.0)
    model.to_empty(device="cpu")  # uninitialized memory everywhere ...
    model.load_state_dict(reference.state_dict())  # ... the weights come back; the RoPE buffers must too
    check = _single(rope_ntk.verify(model.eval()))
    assert check.inv_freq_error <= 1e-6


def test_a_stock_meta_model_materialized_without_its_rope_is_caught():
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(make_config("llama"))
    model.to_empty(device="cpu")
    torch.nn.init.zeros_(model.model.rotary_emb.inv_freq)  # what to_empty leaves is arbitrary: make it wrong
    report = rope_ntk.verify(model, strict=False)
    assert not report.ok and "'model.rotary_emb'" in report.problems[0]


def test_device_map_load_then_patch(tmp_path):
    make_model(make_config("llama")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    rope_ntk.patch(model, "llama3", factor=4.0)
    assert _single(rope_ntk.verify(model)).method == "llama3"


@pytest.mark.parametrize("method", ["yarn", "dynamic-ntk", "dynamic-yarn", "llama3"])
def test_reload_of_a_saved_patched_model(tmp_path, method):
    model = make_model(make_config("llama"))
    rope_ntk.patch(model, method, **PARAMS[method])
    rope_ntk.save_pretrained(model, tmp_path)
    check = _single(rope_ntk.verify(rope_ntk.from_pretrained(tmp_path)))
    assert check.method == method and check.inv_freq_error <= 1e-6


def test_plain_transformers_reload_runs_native_methods_and_verify_catches_the_others(tmp_path):
    """yarn reloads scaled in plain transformers; dynamic-yarn has no transformers equivalent, so
    plain transformers runs the default RoPE while the config records dynamic-yarn."""
    for method, runs in (("yarn", True), ("dynamic-yarn", False)):
        model = make_model(make_config("llama"))
        rope_ntk.patch(model, method, **PARAMS[method])
        rope_ntk.save_pretrained(model, tmp_path / method)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / method).eval()
        report = rope_ntk.verify(plain, strict=False)
        assert report.ok == runs, str(report)
    assert "'model.rotary_emb'" in report.problems[0] and "dynamic-yarn" in report.problems[0]


def test_dynamic_methods_are_probed_past_the_original_length():
    """A dynamic module whose long-length frequencies are wrong passes a short forward,
    so verify also calls it past the original length."""
    model = make_model(make_config("llama"))
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    rotary = model.model.rotary_emb
    rotary.params = {**rotary.params, "factor": 3.0}  # the module computes another scale past 64 tokens
    with pytest.raises(RopeMismatchError, match=r"'model.rotary_emb'.*\(cos, sin\)"):
        rope_ntk.verify(model)


def test_tampered_buffer_is_named():
    model = make_model(make_config("llama"))
    rope_ntk.patch(model, "yarn", factor=4.0)
    with torch.no_grad():
        model.model.rotary_emb.inv_freq[3] *= 1.001
    with pytest.raises(RopeMismatchError) as info:
        rope_ntk.verify(model)
    assert "rotary module 'model.rotary_emb'" in str(info.value) and "inv_freq" in str(info.value)


def test_tampered_attention_factor_is_named():
    model = make_model(make_config("llama"))
    rope_ntk.patch(model, "yarn", factor=4.0)
    model.model.rotary_emb.attention_scaling = 1.0
    with pytest.raises(RopeMismatchError, match=r"'model.rotary_emb': attention factor 1.0"):
        rope_ntk.verify(model)


def test_original_module_put_back_behind_the_patch_is_caught():
    model = make_model(make_config("llama"))
    stock = model.model.rotary_emb
    rope_ntk.patch(model, "linear", factor=2.0)
    model.model.rotary_emb = stock  # config says linear, the stock default module runs
    report = rope_ntk.verify(model, strict=False)
    assert not report.ok
    assert any("is the original LlamaRotaryEmbedding" in p for p in report.problems)


@pytest.mark.parametrize("family", sorted(FAMILY_SIZES))
def test_every_family(family):
    """Stock, then a static and a dynamic method, for every family rope_ntk knows."""
    model = make_model(make_family_config(family))
    assert rope_ntk.verify(model).ok
    for method in ("yarn", "dynamic-yarn"):
        rope_ntk.patch(model, method, factor=2.0)
        report = rope_ntk.verify(model)
        assert all(c.called for c in report.checks)
        assert method in {c.method for c in report.checks}
    if family == "gemma3_text":  # local layers keep their own unscaled RoPE
        assert sorted((c.layer_type, c.method) for c in report.checks) == [
            ("full_attention", "dynamic-yarn"), ("sliding_attention", "none")
        ]


def test_report_reads():
    model = make_model(make_config("llama"))
    rope_ntk.patch(model, "yarn", factor=2.0)
    text = str(rope_ntk.verify(model))
    assert text.startswith("RoPE verified against config.rope_ntk: ok")
    assert "model.rotary_emb: yarn" in text
    assert f"attention_factor={formulas.yarn_attention_factor(2.0):.6g}" in text
