"""Cache-consistent dynamic scaling (issue 4), on tiny float32 models (original context 64).

The claim: after a prefill shorter than the original context, every decoded
step's logits equal a full uncached forward over the same tokens (1e-4),
for dynamic-ntk, dynamic-yarn and longrope, through ``generate`` (greedy and
sampled) and a manual cache loop, on Llama, Qwen2 and Phi-3, with batch 2
left-padded, and with every family layout. The legacy mode
(``cache_consistent=False``) is shown to differ, a short prompt after a long
one is bit-identical to the same prompt first, and ``step`` is shown to cut
the number of re-rotations to exactly one per step crossed.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_families import longrope_lists
from tiny import FAMILY_SIZES, ORIGINAL, make_family_config, make_model, token_ids
from transformers import DynamicCache, StaticCache

import rope_ntk
from rope_ntk import cache as kv
from rope_ntk import methods
from rope_ntk.errors import InvalidParameterError

PREFILL = 40  # < ORIGINAL
DECODE = 70  # to position 109, well past ORIGINAL
ATOL = 1e-4


def rotated_pairs(model) -> int:
    module = rope_ntk.find_rotary_modules(model)[0][1]
    own = getattr(module, "full_attention_inv_freq", None)
    return (own if own is not None else module.inv_freq).numel()


def method_params(method: str, model) -> dict:
    if method == "dynamic-ntk":
        return {"factor": 2.0}
    if method == "dynamic-yarn":
        return {"factor": 4.0}
    return longrope_lists(rotated_pairs(model))


def tiny(family: str):
    return make_model(make_family_config(family))


@torch.no_grad()
def full_forward_steps(model, sequences, prefill, attention_mask=None, lengths=None):
    """Last-position logits of uncached forwards over sequences[:, :n], n = prefill .. end - 1
    (or only ``lengths``): [batch, steps, vocab]."""
    steps = []
    for n in lengths or range(prefill, sequences.shape[1]):
        kwargs = {}
        if attention_mask is not None:
            mask = attention_mask[:, :n]
            kwargs = {"attention_mask": mask, "position_ids": positions_of(mask)}
        steps.append(model(sequences[:, :n], use_cache=False, **kwargs).logits[:, -1])
    return torch.stack(steps, dim=1)


@torch.no_grad()
def causal_reference(family, model, sequences, attention_mask=None):
    """Logits of one uncached forward in which query i and every key it sees are rotated with the
    scaling of length n_i = (largest position in columns 0..i) + 1, rounded up to ``step`` past L.

    Independent of rope_ntk's cache code: a fresh model with the same weights runs eager attention
    in which transformers' own rotation is replaced by this per-query rotation, the frequencies
    taken from the registry formulas (rope_ntk.methods.frequencies). Half layout, full-width RoPE.
    """
    rotary = model.model.rotary_emb
    reference = tiny(family)
    reference.set_attn_implementation("eager")
    positions = positions_of(attention_mask) if attention_mask is not None else (
        torch.arange(sequences.shape[1])[None].expand(sequences.shape[0], -1))
    lengths = [rotary.stepped(n) for n in (positions.max(dim=0).values.cummax(0).values + 1).tolist()]
    freqs = [methods.frequencies(rotary.method, rotary.params, rotary.rope, n if n > rotary.original_max_position_embeddings
                                 else None) for n in lengths]
    inv_freq = torch.stack([f.inv_freq for f in freqs]).float()  # [seq, dim/2], query i's frequencies
    factor = torch.tensor([f.attention_factor for f in freqs], dtype=torch.float32)  # [seq]

    def rotate(x, angles):  # x [batch, heads, seq, dim], angles [batch, seq, dim/2]
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        p = positions[..., None].float()  # [batch, seq, 1]
        q = rotate(query, p * inv_freq) * factor[:, None]
        scores = torch.empty(query.shape[:3] + (key.shape[2],))
        for i in range(query.shape[2]):  # keys rotated with query i's frequencies
            k = rotate(key, p * inv_freq[i]) * factor[i]
            scores[:, :, i] = (q[:, :, i : i + 1] @ k.transpose(2, 3))[:, :, 0] * scaling
        scores = scores + attention_mask if attention_mask is not None else scores
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    module = importlib.import_module(type(reference).__module__)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(module, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (q, k))
        patcher.setattr(module, "eager_attention_forward", attention)
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        return reference(sequences, position_ids=positions, use_cache=False, **kwargs).logits


def checked_lengths(sequences) -> list[int]:
    """Prefix lengths whose uncached forward is run through the patched model (each one spans many
    scalings, so many chunks): both sides of the original length and the end."""
    end = sequences.shape[1] - 1
    return sorted({n for n in (PREFILL, ORIGINAL - 1, ORIGINAL, ORIGINAL + 1, ORIGINAL + 17, end) if n <= end})


def positions_of(mask):
    """Position ids as generate derives them from a left-padded attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def generate_logits(model, ids, sample: bool, **kwargs):
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=sample, top_k=0, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@torch.no_grad()
def manual_logits(model, sequences, prefill, cache=None):
    """Logits of a prefill call then one call per token, through a DynamicCache passed as ``cache``."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    steps = [model(sequences[:, :prefill], cache=cache).logits[:, -1]]
    for t in range(prefill, sequences.shape[1] - 1):
        steps.append(model(sequences[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("method", ["dynamic-ntk", "dynamic-yarn", "longrope"])
@pytest.mark.parametrize("path", ["greedy", "sampled", "manual"])
def test_every_decoded_step_equals_full_forward(family, method, path):
    model = tiny(family)
    rope_ntk.patch(model, method, **method_params(method, model))  # cache_consistent is the default
    ids = token_ids(PREFILL)
    if path == "manual":
        sequences = torch.cat([ids, token_ids(DECODE, seed=5)], dim=1)
        decoded = manual_logits(model, sequences, PREFILL)
    else:
        sequences, decoded = generate_logits(model, ids, sample=path == "sampled")
    assert sequences.shape[1] == PREFILL + DECODE > ORIGINAL + 40
    # every step equals one uncached forward computed without rope_ntk's cache code
    reference = causal_reference(family, model, sequences)[:, PREFILL - 1 : -1]
    torch.testing.assert_close(decoded, reference, atol=ATOL, rtol=0)
    # and the patched model's own uncached forward over a prefix ends with that step's logits
    lengths = checked_lengths(sequences)
    full = full_forward_steps(model, sequences, PREFILL, lengths=lengths)
    torch.testing.assert_close(decoded[:, [n - PREFILL for n in lengths]], full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dynamic-ntk", "dynamic-yarn", "longrope"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_batch_of_two_left_padded(family, method):
    """Rows of different prompt lengths: cached keys re-rotate with each row's own positions."""
    model = tiny(family)
    rope_ntk.patch(model, method, **method_params(method, model))
    ids = token_ids(PREFILL, batch=2, seed=7).clamp(min=3)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0  # row 1: a 25-token prompt, left-padded
    ids[1, :15] = 0
    sequences, decoded = generate_logits(model, ids, sample=False, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(2, DECODE, dtype=mask.dtype)], dim=1)
    lengths = checked_lengths(sequences)
    full = full_forward_steps(model, sequences, PREFILL, full_mask, lengths)
    torch.testing.assert_close(decoded[:, [n - PREFILL for n in lengths]], full, atol=ATOL, rtol=0)
    reference = causal_reference(family, model, sequences, full_mask)[:, PREFILL - 1 : -1]
    torch.testing.assert_close(decoded[0], reference[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded[1], reference[1], atol=ATOL, rtol=0)
    # the rows really sit at different positions when the scaling changes
    state = next(iter(kv.states(generate_cache(model, ids, mask)).values()))
    assert state.positions[0, -1] - state.positions[1, -1] == 15


def generate_cache(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=DECODE, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0, min_new_tokens=DECODE)
    return getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["dynamic-ntk", "dynamic-yarn", "longrope"])
def test_legacy_mode_differs_past_the_original_length(family, method):
    model = tiny(family)
    params = method_params(method, model)
    rope_ntk.patch(model, method, cache_consistent=False, **params)
    sequences = torch.cat([token_ids(PREFILL), token_ids(DECODE, seed=5)], dim=1)
    decoded = manual_logits(model, sequences, PREFILL)
    full = full_forward_steps(model, sequences, PREFILL)
    gap = (decoded - full).abs().amax(dim=(0, 2))  # per step
    before = ORIGINAL - PREFILL  # steps whose whole input fits the original context
    assert gap[:before].max() < ATOL
    assert gap[before + 5 :].max() > 0.05


def test_legacy_full_forward_is_transformers_whole_length_scaling():
    """Legacy keeps transformers' semantics: every token scaled for the whole input length."""
    consistent, legacy = tiny("llama"), tiny("llama")
    rope_ntk.patch(consistent, "dynamic-ntk", factor=2.0)
    rope_ntk.patch(legacy, "dynamic-ntk", factor=2.0, cache_consistent=False)
    ids = token_ids(120)
    with torch.no_grad():
        a, b = consistent(ids).logits, legacy(ids).logits
    assert torch.equal(a[:, :ORIGINAL], b[:, :ORIGINAL]) is False  # legacy rescales even early tokens
    assert (a[:, ORIGINAL:] - b[:, ORIGINAL:]).abs().max() > 0.05
    with torch.no_grad():  # the consistent first 64 logits are those of the first 64 tokens alone
        assert torch.equal(a[:, :ORIGINAL], consistent(ids[:, :ORIGINAL]).logits)


@pytest.mark.parametrize("method", ["dynamic-ntk", "dynamic-yarn", "longrope"])
def test_short_prompt_after_long_one_is_bit_identical(method):
    model = tiny("llama")
    rope_ntk.patch(model, method, **method_params(method, model))
    short = token_ids(20, seed=3)
    first_seq, first = generate_logits(model, short, sample=False)  # to 89: crosses 64 too
    with torch.no_grad():
        first_full = model(short).logits
    generate_logits(model, token_ids(PREFILL + 30, seed=4), sample=True)  # a long one, to 139
    again_seq, again = generate_logits(model, short, sample=False)
    with torch.no_grad():
        again_full = model(short).logits
    assert torch.equal(first_seq, again_seq)
    assert torch.equal(first, again)
    assert torch.equal(first_full, again_full)


def count_rotations(monkeypatch) -> list:
    calls = []
    original = kv.rotate_keys
    monkeypatch.setattr(kv, "rotate_keys", lambda *a, **k: (calls.append(a[0].shape[-2]), original(*a, **k)))
    return calls


@pytest.mark.parametrize("step, rotations", [(1, 45), (16, 3), (64, 1)])
def test_step_rounds_the_length_and_amortises_re_rotation(monkeypatch, step, rotations):
    """From 40 to 109: lengths 65..109 change the scaling every token, or once per step crossed."""
    model = tiny("llama")
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0, step=step)
    rotary = model.model.rotary_emb
    assert rotary.stepped(65) == -(-65 // step) * step and rotary.stepped(64) == 64
    calls = count_rotations(monkeypatch)
    sequences = torch.cat([token_ids(PREFILL), token_ids(DECODE, seed=5)], dim=1)
    decoded = manual_logits(model, sequences, PREFILL)
    assert len(calls) == rotations * model.config.num_hidden_layers
    reference = causal_reference("llama", model, sequences)[:, PREFILL - 1 : -1]
    torch.testing.assert_close(decoded, reference, atol=ATOL, rtol=0)


def test_default_step_is_a_64th_of_the_original_length():
    model = make_model(make_family_config("llama", max_position_embeddings=1024))
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    assert model.model.rotary_emb.step == 16
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0, cache_consistent=False)
    assert model.model.rotary_emb.step == 1  # legacy: transformers' every length


# families whose cached keys take another layout or channel placement than Llama's
LAYOUT_FAMILIES = ["phi", "gpt_neox", "stablelm", "persimmon", "nemotron", "cohere", "gptj", "gemma3_text",
                   "gemma2", "mistral", "falcon"]


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_family_layouts_re_rotate_their_own_channels(family):
    """Partial rotary, interleaved and (sin, cos) pairs, DeepSeek's trailing rotated channels, sliding layers."""
    assert family in FAMILY_SIZES
    model = tiny(family)
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    sequences = torch.cat([token_ids(PREFILL), token_ids(40, seed=5)], dim=1)
    cache = DynamicCache(config=model.config)
    decoded = manual_logits(model, sequences, PREFILL, cache)
    lengths = checked_lengths(sequences)
    full = full_forward_steps(model, sequences, PREFILL, lengths=lengths)
    torch.testing.assert_close(decoded[:, [n - PREFILL for n in lengths]], full, atol=ATOL, rtol=0)
    # Independent of the cache code: the first scaled layer's keys depend on the tokens alone, so once
    # re-rotated they equal those one legacy forward over all the tokens caches (the same scaling)
    first = next(m for m in model.modules() if isinstance(m, rope_ntk.ScaledRotaryEmbedding) and m.cache_consistent)
    layer = (first.layer_indices or [0])[0]
    if layer == 0:
        legacy = tiny(family)
        rope_ntk.patch(legacy, "dynamic-ntk", factor=2.0, cache_consistent=False)
        fresh = DynamicCache(config=legacy.config)
        with torch.no_grad():
            legacy(sequences[:, :-1], cache=fresh)
        assert cache.layers[0].keys.shape == fresh.layers[0].keys.shape  # a sliding layer keeps its window
        torch.testing.assert_close(cache.layers[0].keys, fresh.layers[0].keys, atol=1e-5, rtol=1e-5)


def test_deepseek_v3_falls_back_to_legacy_and_refuses_explicit_consistency():
    model = tiny("deepseek_v3")
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    assert model.model.rotary_emb.cache_consistent is False
    with pytest.raises(NotImplementedError, match=r"cache_consistent=True for 'dynamic-ntk' on DeepSeek-V3.*values"):
        rope_ntk.patch(model, "dynamic-ntk", factor=2.0, cache_consistent=True)


def test_unpatch_removes_the_consistent_forward():
    model = tiny("llama")
    ids = token_ids(100)
    with torch.no_grad():
        before = model(ids).logits
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    assert "forward" in vars(model.model)
    rope_ntk.unpatch(model)
    assert "forward" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_bad_cache_consistent_names_the_argument():
    with pytest.raises(InvalidParameterError, match=r"cache_consistent='yes' must be True, False or None"):
        rope_ntk.patch(tiny("llama"), "dynamic-ntk", factor=2.0, cache_consistent="yes")


def test_bad_step_names_the_argument():
    with pytest.raises(InvalidParameterError, match=r"step=0 for method 'dynamic-ntk' must be >= 1"):
        rope_ntk.patch(tiny("llama"), "dynamic-ntk", factor=2.0, step=0)


def test_static_cache_is_refused_with_the_alternative():
    model = tiny("llama")
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    cache = StaticCache(config=model.config, max_cache_len=128)
    with pytest.raises(NotImplementedError, match=r"StaticCache.*cache_consistent=False"):
        model(token_ids(10), cache=cache)


def test_a_cache_filled_before_patching_is_refused():
    model = tiny("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(token_ids(10), cache=cache)
    rope_ntk.patch(model, "dynamic-ntk", factor=2.0)
    with pytest.raises(ValueError, match=r"already holds 10 tokens"):
        model(token_ids(1), cache=cache)
