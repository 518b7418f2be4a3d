"""Bad input: the right exception type, a message that names the argument and
the bad value, and a model left exactly as it was."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny import ORIGINAL, logits_of, make_model

import rope_ntk
from rope_ntk import InvalidParameterError, methods


@pytest.fixture
def guarded(llama, long_ids):
    """The tiny Llama plus a check that a failed call changed nothing."""
    stock = logits_of(llama, long_ids)
    module = llama.model.rotary_emb
    rope = copy.deepcopy(llama.config.rope_parameters)

    def unchanged():
        assert not rope_ntk.is_patched(llama)
        assert llama.model.rotary_emb is module
        assert llama.config.rope_parameters == rope
        assert not hasattr(llama.config, "rope_ntk")
        assert torch.equal(logits_of(llama, long_ids), stock)

    return llama, unchanged


def raises_naming(exc_type, call, *fragments):
    """Run ``call``; it must raise ``exc_type`` whose message contains every fragment."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- methods and parameters


@pytest.mark.parametrize("name", ["foo", "ntk_by_halves", "", "YaRN2"])
def test_unknown_method(guarded, name):
    model, unchanged = guarded
    message = raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, name, factor=2), f"method={name!r}")
    for valid in ("none", "linear", "ntk", "dynamic-ntk", "yarn"):
        assert valid in message  # lists what is valid
    unchanged()


def test_unknown_method_not_a_string(guarded):
    model, unchanged = guarded
    raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, None), "method=None")
    unchanged()


BAD_FACTORS = [0, -1, 0.5, float("nan"), float("inf"), float("-inf"), "2", None, True, [2]]


@pytest.mark.parametrize("method", ["linear", "dynamic-ntk", "yarn", "ntk"])
@pytest.mark.parametrize("factor", BAD_FACTORS, ids=[repr(f) for f in BAD_FACTORS])
def test_bad_factor(guarded, method, factor):
    model, unchanged = guarded
    if method == "ntk" and factor is None:
        # ntk takes alpha or factor; with neither it must say it needs one
        raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, method, factor=None), "alpha", "factor")
    else:
        raises_naming(
            InvalidParameterError, lambda: rope_ntk.patch(model, method, factor=factor), f"factor={factor!r}", method
        )
    unchanged()


def test_missing_factor(guarded):
    model, unchanged = guarded
    for method in ("linear", "dynamic-ntk", "yarn"):
        raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, method), "factor", repr(method))
    raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, "ntk"), "alpha")
    unchanged()


@pytest.mark.parametrize("alpha", [0.99, 0.5, 0, -2.0])
def test_ntk_alpha_below_one(guarded, alpha):
    model, unchanged = guarded
    raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, "ntk", alpha=alpha), f"alpha={alpha!r}", "1")
    unchanged()


def test_ntk_alpha_and_factor_disagree(guarded):
    model, unchanged = guarded
    raises_naming(
        InvalidParameterError, lambda: rope_ntk.patch(model, "ntk", alpha=2.0, factor=3.0), "alpha=2.0", "factor=3.0"
    )
    unchanged()
    # agreeing values are fine
    rope_ntk.patch(model, "ntk", alpha=2.0, factor=2.0)
    assert rope_ntk.describe(model)[0]["params"] == {"alpha": 2.0}


@pytest.mark.parametrize(
    "method,params,fragments",
    [
        ("linear", {"factor": 2, "fudge": 3}, ["fudge=3", "'linear'", "factor"]),
        ("none", {"factor": 2}, ["factor=2", "'none'"]),
        ("yarn", {"factor": 2, "alpha": 2}, ["alpha=2", "'yarn'"]),
        ("ntk", {"alpha": 2, "beta_fast": 32}, ["beta_fast=32", "'ntk'"]),
    ],
)
def test_unknown_parameter_name(guarded, method, params, fragments):
    model, unchanged = guarded
    raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, method, **params), *fragments)
    unchanged()


@pytest.mark.parametrize("beta_fast,beta_slow", [(1.0, 2.0), (4.0, 4.0), (0.5, 1.0)])
def test_yarn_beta_fast_not_above_beta_slow(guarded, beta_fast, beta_slow):
    model, unchanged = guarded
    raises_naming(
        InvalidParameterError,
        lambda: rope_ntk.patch(model, "yarn", factor=2, beta_fast=beta_fast, beta_slow=beta_slow),
        f"beta_fast={beta_fast!r}",
        f"beta_slow={beta_slow!r}",
    )
    unchanged()


@pytest.mark.parametrize(
    "method,params,fragment",
    [
        ("yarn", {"factor": 2, "beta_fast": 0}, "beta_fast=0"),
        ("yarn", {"factor": 2, "beta_slow": -1.0}, "beta_slow=-1.0"),
        ("yarn", {"factor": 2, "attention_factor": 0.0}, "attention_factor=0.0"),
        ("yarn", {"factor": 2, "attention_factor": math.nan}, "attention_factor=nan"),
        ("yarn", {"factor": 2, "truncate": "yes"}, "truncate='yes'"),
        ("yarn", {"factor": 2, "original_max_position_embeddings": 0}, "original_max_position_embeddings=0"),
        ("dynamic-ntk", {"factor": 2, "original_max_position_embeddings": 10.5}, "original_max_position_embeddings=10.5"),
        ("dynamic-ntk", {"factor": 2, "original_max_position_embeddings": "64"}, "original_max_position_embeddings='64'"),
    ],
)
def test_other_bad_values(guarded, method, params, fragment):
    model, unchanged = guarded
    raises_naming(InvalidParameterError, lambda: rope_ntk.patch(model, method, **params), fragment)
    unchanged()


def test_all_problems_reported_at_once(guarded):
    model, unchanged = guarded
    raises_naming(
        InvalidParameterError,
        lambda: rope_ntk.patch(model, "yarn", factor=0, beta_fast="x", bogus=1),
        "factor=0",
        "beta_fast='x'",
        "bogus=1",
    )
    unchanged()


def test_validate_params_directly():
    with pytest.raises(InvalidParameterError, match=r"factor=-1"):
        methods.validate_params("linear", {"factor": -1})
    with pytest.raises(InvalidParameterError, match=r"method='nope'"):
        methods.validate_params("nope", {})
    # InvalidParameterError is a ValueError, for callers that catch that
    assert issubclass(InvalidParameterError, ValueError)


def test_failed_repatch_keeps_the_earlier_patch(llama, long_ids):
    rope_ntk.patch(llama, "yarn", factor=2)
    patched = logits_of(llama, long_ids)
    recorded = copy.deepcopy(llama.config.rope_parameters)
    with pytest.raises(InvalidParameterError, match=r"factor=0"):
        rope_ntk.patch(llama, "linear", factor=0)
    assert rope_ntk.describe(llama)[0]["method"] == "yarn"
    assert llama.config.rope_parameters == recorded
    assert torch.equal(logits_of(llama, long_ids), patched)


# ---------------------------------------------------------------- unsupported models


def test_model_without_rotary_embedding():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=ORIGINAL)
    gpt2 = make_model(config)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    before = logits_of(gpt2, ids)
    message = raises_naming(rope_ntk.UnsupportedModelError, lambda: rope_ntk.patch(gpt2, "yarn", factor=2), "GPT2")
    assert "rotary" in message
    assert not rope_ntk.is_patched(gpt2)
    assert not hasattr(gpt2.config, "rope_ntk")
    assert torch.equal(logits_of(gpt2, ids), before)
    assert issubclass(rope_ntk.UnsupportedModelError, rope_ntk.RopeNtkError)


class _InterleavedRotary(torch.nn.Module):
    """A rotary module with the interleaved (GPT-J) layout: [f0, f0, f1, f1, ...]."""

    def __init__(self, inv_freq):
        super().__init__()
        self.inv_freq = torch.nn.Buffer(inv_freq.clone(), persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = freqs.repeat_interleave(2, dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def test_model_with_other_rotary_layout_is_refused(llama, long_ids):
    odd = _InterleavedRotary(llama.model.rotary_emb.inv_freq)
    llama.model.rotary_emb = odd
    before = logits_of(llama, long_ids)
    raises_naming(rope_ntk.UnsupportedModelError, lambda: rope_ntk.patch(llama, "linear", factor=2), "model.rotary_emb")
    assert llama.model.rotary_emb is odd
    assert not rope_ntk.is_patched(llama)
    assert not hasattr(llama.config, "rope_ntk")
    assert torch.equal(logits_of(llama, long_ids), before)


# ---------------------------------------------------------------- loading


def test_load_model_missing_gguf(tmp_path):
    missing = tmp_path / "nowhere" / "model.Q4_0.gguf"
    message = raises_naming(rope_ntk.ModelLoadError, lambda: rope_ntk.load_model(str(missing)), f"model={str(missing)!r}")
    assert "GGUF" in message
    assert issubclass(rope_ntk.ModelLoadError, OSError)


def test_load_model_bad_path_and_dtype(tmp_path):
    not_a_model = tmp_path / "file.bin"
    not_a_model.write_bytes(b"\0" * 16)
    raises_naming(rope_ntk.ModelLoadError, lambda: rope_ntk.load_model(str(not_a_model)), f"model={str(not_a_model)!r}")
    raises_naming(InvalidParameterError, lambda: rope_ntk.load_model("bundled", dtype="float8"), "dtype='float8'")


def test_load_model_directory_without_model(tmp_path):
    raises_naming(rope_ntk.ModelLoadError, lambda: rope_ntk.load_model(str(tmp_path)), f"model={str(tmp_path)!r}")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.txt", "missing.json"])
def test_load_corpus_missing_file(tmp_path, name):
    path = str(tmp_path / name)
    message = raises_naming(rope_ntk.CorpusError, lambda: rope_ntk.load_corpus(path), f"corpus={path!r}")
    assert "no such file" in message


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", "  \n\n\t"), ("empty.jsonl", ""),
                                          ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_load_corpus_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = raises_naming(rope_ntk.CorpusError, lambda: rope_ntk.load_corpus(str(path)), f"corpus={str(path)!r}")
    assert "no text" in message


def test_load_corpus_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    raises_naming(rope_ntk.CorpusError, lambda: rope_ntk.load_corpus(str(path)), f"corpus={str(path)!r}", "line 2")


def test_load_corpus_jsonl_without_text_field(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"body": "words"}) + "\n")
    raises_naming(rope_ntk.CorpusError, lambda: rope_ntk.load_corpus(str(path)), "line 1", "'text'")
    # and with the right field name it loads
    assert rope_ntk.load_corpus(str(path), text_field="body") == ["words"]


def test_load_corpus_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{oops")
    raises_naming(rope_ntk.CorpusError, lambda: rope_ntk.load_corpus(str(path)), f"corpus={str(path)!r}", "JSON")


def test_load_corpus_good_files(tmp_path):
    """The error tests above are not vacuous: the same readers accept good files."""
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "", "z"]) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "p"}, {"text": "q"}]))
    assert rope_ntk.load_corpus(str(tmp_path / "a.txt")) == ["one document"]
    assert rope_ntk.load_corpus(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    assert rope_ntk.load_corpus(str(tmp_path / "c.json")) == ["p", "q"]
