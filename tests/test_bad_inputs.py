"""The bad-input matrix: one row per bad input, across the Python API, the
configs a model directory carries and the ``eval/`` command line.

Every row asserts the error type (exit status 2 and one ``error:`` line for
the command line), that the message holds each fragment (the argument, the
bad value, what is valid) and that nothing was left behind: a model that
failed to patch is unchanged, an output folder gets no results file and no
temp files. To add a case, add a row to the table of its kind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from evalkit import TINY_LM_CONTEXT, bundled_tokenizer, save_tiny_lm, write_corpus
from test_cli import error_line, run_main
from tiny import TINY, logits_of, make_config, make_family_config, make_model, token_ids

import rope_ntk
from rope_ntk import CorpusError, InvalidParameterError, ModelLoadError, UnsupportedModelError
from rope_ntk.evaluation import passkey as pk
from rope_ntk.evaluation import perplexity as pp
from rope_ntk.evaluation.sweep import SweepConfig, run_sweep
from rope_ntk.rotary import LayerTypeRotary, ScaledRotaryEmbedding

ROOT = Path(__file__).resolve().parent.parent
IDS = token_ids(80, seed=3)


@dataclass
class Row:
    """One bad input: ``call(ctx)`` must raise ``error`` whose message holds every fragment."""

    id: str
    call: Callable[["Ctx"], Any]
    error: type[Exception]
    fragments: tuple[str, ...]


class Ctx:
    """What a row may use: a fresh tiny Llama, a temp folder and saved assets."""

    def __init__(self, tmp: Path, assets: dict[str, Path]):
        self.tmp = tmp
        self.assets = assets
        self.model = make_model(make_config("llama"))

    def model_dir(self, edit: Callable[[dict], None]) -> str:
        """The saved tiny LM with its config.json changed by ``edit`` (other files linked)."""
        target = self.tmp / "edited-lm"
        target.mkdir()
        for source in self.assets["lm"].iterdir():
            if source.name != "config.json":
                (target / source.name).symlink_to(source)
        config = json.loads((self.assets["lm"] / "config.json").read_text())
        edit(config)
        (target / "config.json").write_text(json.dumps(config))
        return str(target)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def sweep(self, **fields) -> Path:
        out = self.tmp / "out"
        config = dict(model=str(self.assets["lm"]), corpus=str(self.assets["corpus"]), methods=("none", "yarn"),
                      lengths=(128,), ppl_tokens=128, depths=(0.5,), dtype="float32")
        run_sweep(SweepConfig(**{**config, **fields}), out, plot=False)
        return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-assets")
    gguf_path = root / "tiny.gguf"
    _write_gguf(gguf_path)
    return {
        "lm": save_tiny_lm(root / "tiny-lm"),
        "corpus": write_corpus(root / "corpus.txt"),
        "gpt2": _save_gpt2(root / "gpt2"),
        "gguf": gguf_path,
    }


def _write_gguf(path: Path) -> None:
    """A small but well-formed GGUF file (llama metadata and one tensor), written with ``gguf``."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_head_count(2)
    writer.add_feed_forward_length(32)
    writer.add_tensor("token_embd.weight", np.arange(8 * 16, dtype=np.float32).reshape(8, 16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _save_gpt2(directory: Path) -> Path:
    """A tiny GPT-2 (learned positions, no RoPE) over the bundled tokenizer, saved like a real model."""
    from transformers import AutoConfig

    tokenizer = bundled_tokenizer()
    config = AutoConfig.for_model("gpt2", n_embd=32, n_head=2, n_layer=1, vocab_size=len(tokenizer), n_positions=512)
    directory.mkdir()
    tokenizer.save_pretrained(directory)
    make_model(config).save_pretrained(directory)
    return directory


def _gguf_bytes(ctx: Ctx) -> bytes:
    return ctx.assets["gguf"].read_bytes()


def _rope(**entry) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["rope_parameters"] = {"rope_theta": 10000.0, **entry}

    return edit


def _set(**keys) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config.pop("rope_parameters", None)
        config.update(keys)

    return edit


class _InterleavedRotary(torch.nn.Module):
    """A rotary module of another layout than its family's: [f0, f0, f1, f1, ...]."""

    def __init__(self, inv_freq):
        super().__init__()
        self.inv_freq = torch.nn.Buffer(inv_freq.clone(), persistent=False)

    def forward(self, x, position_ids):
        emb = (position_ids[..., None].float() * self.inv_freq).repeat_interleave(2, dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _odd_layout(ctx: Ctx):
    ctx.model = make_model(make_config("llama"))
    ctx.model.model.rotary_emb = _InterleavedRotary(ctx.model.model.rotary_emb.inv_freq)
    return rope_ntk.patch(ctx.model, "linear", factor=2)


def _llama4(ctx: Ctx):
    from transformers import AutoConfig

    ctx.model = make_model(AutoConfig.for_model("llama4_text", **TINY))
    return rope_ntk.patch(ctx.model, "yarn", factor=2)


def _gemma3(ctx: Ctx, **kwargs):
    ctx.model = make_model(make_family_config("gemma3_text"))
    return rope_ntk.patch(ctx.model, "yarn", factor=2, **kwargs)


def _no_rotary(ctx: Ctx):
    from transformers import AutoConfig

    ctx.model = make_model(AutoConfig.for_model("gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128))
    return rope_ntk.patch(ctx.model, "yarn", factor=2)


def _tokenizer():
    return bundled_tokenizer()


# ---------------------------------------------------------------- Python API: patch and methods

PATCH_ROWS = [
    Row("unknown-method", lambda c: rope_ntk.patch(c.model, "foo", factor=2), InvalidParameterError,
        ("method='foo'", "valid methods", "yarn", "dynamic-ntk")),
    Row("method-not-a-string", lambda c: rope_ntk.patch(c.model, 3), InvalidParameterError,
        ("method=3", "valid methods")),
    Row("factor-0", lambda c: rope_ntk.patch(c.model, "linear", factor=0), InvalidParameterError,
        ("factor=0", "'linear'", ">= 1")),
    Row("factor-negative", lambda c: rope_ntk.patch(c.model, "yarn", factor=-2.0), InvalidParameterError,
        ("factor=-2.0", "'yarn'", ">= 1")),
    Row("factor-nan", lambda c: rope_ntk.patch(c.model, "dynamic-ntk", factor=math.nan), InvalidParameterError,
        ("factor=nan", "finite")),
    Row("factor-inf", lambda c: rope_ntk.patch(c.model, "llama3", factor=math.inf), InvalidParameterError,
        ("factor=inf", "finite")),
    Row("factor-string", lambda c: rope_ntk.patch(c.model, "linear", factor="2"), InvalidParameterError,
        ("factor='2'", "must be a number")),
    Row("factor-tensor-of-two", lambda c: rope_ntk.patch(c.model, "linear", factor=torch.tensor([2.0, 3.0])),
        InvalidParameterError, ("factor=tensor", "must be a number")),
    Row("alpha-below-1", lambda c: rope_ntk.patch(c.model, "ntk", alpha=0.5), InvalidParameterError,
        ("alpha=0.5", ">= 1")),
    Row("alpha-factor-conflict", lambda c: rope_ntk.patch(c.model, "ntk", alpha=2.0, factor=3.0),
        InvalidParameterError, ("alpha=2.0", "factor=3.0", "disagree", "give one")),
    Row("missing-factor", lambda c: rope_ntk.patch(c.model, "yarn"), InvalidParameterError,
        ("needs factor", "context extension ratio")),
    Row("unknown-parameter", lambda c: rope_ntk.patch(c.model, "linear", factor=2, fudge=1), InvalidParameterError,
        ("fudge=1", "not a parameter", "valid: factor")),
    Row("beta-order", lambda c: rope_ntk.patch(c.model, "yarn", factor=2, beta_fast=1, beta_slow=2),
        InvalidParameterError, ("beta_fast=1", "beta_slow=2", "greater than")),
    Row("llama3-freq-order", lambda c: rope_ntk.patch(c.model, "llama3", factor=4, low_freq_factor=4,
                                                        high_freq_factor=1),
        InvalidParameterError, ("high_freq_factor=1", "low_freq_factor=4", "greater than")),
    Row("original-0", lambda c: rope_ntk.patch(c.model, "yarn", factor=2, original_max_position_embeddings=0),
        InvalidParameterError, ("original_max_position_embeddings=0", "> 0")),
    Row("original-not-int", lambda c: rope_ntk.patch(c.model, "dynamic-ntk", factor=2,
                                                       original_max_position_embeddings=64.5),
        InvalidParameterError, ("original_max_position_embeddings=64.5", "whole number")),
    Row("longrope-wrong-length", lambda c: rope_ntk.patch(c.model, "longrope", short_factor=[1.0] * 3,
                                                            long_factor=[2.0] * 8),
        InvalidParameterError, ("short_factor has 3 values", "needs 8")),
    Row("longrope-not-a-list", lambda c: rope_ntk.patch(c.model, "longrope", short_factor="1,1", long_factor=[2.0]),
        InvalidParameterError, ("short_factor='1,1'", "non-empty list of numbers")),
    Row("longrope-factor-overflows", lambda c: rope_ntk.patch(c.model, "longrope", short_factor=[5e-324] + [1.0] * 7,
                                                                long_factor=[2.0] * 8),
        InvalidParameterError, ("short_factor[0]=5e-324", "infinite", "valid: factors whose frequencies stay finite")),
    Row("cache-consistent-string", lambda c: rope_ntk.patch(c.model, "dynamic-ntk", factor=2, cache_consistent="yes"),
        InvalidParameterError, ("cache_consistent='yes'", "True, False or None")),
    Row("layer-types-on-llama", lambda c: rope_ntk.patch(c.model, "yarn", factor=2, layer_types=["full_attention"]),
        InvalidParameterError, ("layer_types=['full_attention']", "leave layer_types out")),
    Row("layer-types-unknown", lambda c: _gemma3(c, layer_types=["global"]), InvalidParameterError,
        ("layer_types=['global']", "valid: full_attention, sliding_attention")),
    Row("hf-type-disagree", lambda c: rope_ntk.patch_from_hf(c.model, {"rope_type": "yarn", "type": "linear",
                                                                       "factor": 2.0}),
        InvalidParameterError, ("rope_parameters['rope_type']='yarn'", "['type']='linear'", "give one")),
    Row("hf-unknown-type", lambda c: rope_ntk.patch_from_hf(c.model, {"rope_type": "foo", "factor": 2.0}),
        InvalidParameterError, ("rope_type']='foo'", "valid: default, linear")),
    Row("no-rotary-gpt2", _no_rotary, UnsupportedModelError, ("GPT2LMHeadModel", "no rotary embedding", "Llama")),
    Row("unsupported-family-llama4", _llama4, UnsupportedModelError,
        ("Llama4", "model.rotary_emb", "wrong channels")),
    Row("other-rotary-layout", _odd_layout, UnsupportedModelError, ("model.rotary_emb", "'half'-layout")),
]


@pytest.mark.parametrize("row", PATCH_ROWS, ids=[r.id for r in PATCH_ROWS])
def test_patch_rejects(row, tmp_path, assets):
    ctx = Ctx(tmp_path, assets)
    default, rotary = ctx.model, ctx.model.model.rotary_emb
    stock = logits_of(default, IDS[:, :48])
    with pytest.raises(row.error) as info:
        row.call(ctx)
    message = str(info.value)
    for fragment in row.fragments:
        assert fragment in message, (fragment, message)
    model = ctx.model  # a row may have built its own model: check that one
    assert not rope_ntk.is_patched(model)
    assert not hasattr(model.config, "rope_ntk")
    assert not [m for m in model.modules() if isinstance(m, (ScaledRotaryEmbedding, LayerTypeRotary))]
    if model is default:
        assert default.model.rotary_emb is rotary
        assert torch.equal(logits_of(default, IDS[:, :48]), stock)


# ---------------------------------------------------------------- loading models and configs

LOAD_ROWS = [
    Row("gguf-missing", lambda c: rope_ntk.load_model(str(c.tmp / "none.gguf")), ModelLoadError,
        ("model=", "none.gguf", "no such GGUF file")),
    Row("gguf-not-gguf", lambda c: rope_ntk.load_model(c.file("junk.gguf", b"PK\x03\x04 not a gguf" * 8)),
        ModelLoadError, ("model=", "junk.gguf", "GGUF magic")),
    Row("gguf-empty", lambda c: rope_ntk.load_model(c.file("empty.gguf", b"")), ModelLoadError,
        ("model=", "empty.gguf", "empty file")),
    Row("gguf-truncated-header", lambda c: rope_ntk.load_model(c.file("head.gguf", _gguf_bytes(c)[:30])),
        ModelLoadError, ("model=", "head.gguf", "(gguf)")),
    Row("gguf-truncated-tensors", lambda c: rope_ntk.load_model(c.file("half.gguf", _gguf_bytes(c)[:-200])),
        ModelLoadError, ("model=", "half.gguf", "(gguf)")),
    Row("gguf-without-tokenizer", lambda c: rope_ntk.load_model(str(c.assets["gguf"])), ModelLoadError,
        ("model=", "tiny.gguf", "tokenizer")),
    Row("dtype-unknown", lambda c: rope_ntk.load_model(str(c.assets["lm"]), dtype="float8"), InvalidParameterError,
        ("dtype='float8'", "valid: float32, bfloat16, float16")),
    Row("trust-remote-code-string", lambda c: rope_ntk.load_model(str(c.assets["lm"]), trust_remote_code="yes"),
        InvalidParameterError, ("trust_remote_code='yes'", "True or False")),
    Row("path-not-a-model", lambda c: rope_ntk.load_model(c.file("weights.bin", b"\0" * 16)), ModelLoadError,
        ("model=", "weights.bin", "neither a model directory")),
    Row("config-factor-0", lambda c: rope_ntk.load_model(c.model_dir(_rope(rope_type="yarn", factor=0,
                                                                           original_max_position_embeddings=64))),
        InvalidParameterError, ("config.json", "rope_parameters (rope_type 'yarn')", "factor=0", ">= 1")),
    Row("config-factor-nan-4x", lambda c: rope_ntk.load_model(c.model_dir(_set(
        rope_theta=10000.0, rope_scaling={"type": "linear", "factor": math.nan})),
    ), InvalidParameterError, ("config.json", "rope_scaling", "factor=nan", "finite")),
    Row("config-factor-string", lambda c: rope_ntk.load_model(c.model_dir(_rope(rope_type="dynamic", factor="4"))),
        InvalidParameterError, ("config.json", "factor='4'", "must be a number")),
    Row("config-yarn-without-factor", lambda c: rope_ntk.load_model(c.model_dir(_rope(
        rope_type="yarn", original_max_position_embeddings=64))),
        InvalidParameterError, ("config.json", "needs factor")),
    Row("config-unknown-rope-type", lambda c: rope_ntk.load_model(c.model_dir(_rope(rope_type="foo", factor=2))),
        InvalidParameterError, ("config.json rope_parameters['rope_type']='foo'", "valid:", "yarn")),
    Row("config-type-disagree", lambda c: rope_ntk.load_model(c.model_dir(_rope(
        rope_type="yarn", type="linear", factor=2.0, original_max_position_embeddings=64))),
        InvalidParameterError, ("config.json", "'yarn'", "'linear'", "give one")),
    Row("config-original-missing", lambda c: rope_ntk.load_model(c.model_dir(_rope(rope_type="yarn", factor=2.0))),
        InvalidParameterError, ("config.json rope_parameters", "no original_max_position_embeddings",
                                f"max_position_embeddings={TINY_LM_CONTEXT}")),
    Row("config-original-above-target", lambda c: rope_ntk.load_model(c.model_dir(_rope(
        rope_type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=1000))),
        InvalidParameterError, ("original_max_position_embeddings=1000", f"max_position_embeddings={TINY_LM_CONTEXT}",
                                "valid: an original length <=")),
    Row("config-rope-not-a-dict", lambda c: rope_ntk.load_model(c.model_dir(_set(rope_parameters="yarn"))),
        InvalidParameterError, ("config.json rope_parameters='yarn'", "JSON object")),
    Row("config-not-json", lambda c: _broken_json(c), ModelLoadError, ("model=", "config.json is not valid JSON")),
    Row("config-bad-rope-ntk-record", lambda c: rope_ntk.load_model(c.model_dir(
        lambda cfg: cfg.update(rope_ntk={"method": "yarn", "params": {"factor": 0}}))),
        InvalidParameterError, ("factor=0", "'yarn'", ">= 1")),
    Row("config-rope-ntk-record-not-a-record", lambda c: rope_ntk.load_model(c.model_dir(
        lambda cfg: cfg.update(rope_ntk={"method": 7}))),
        InvalidParameterError, ("config.rope_ntk=", "needs 'method' (a string)")),
]


def _broken_json(ctx: Ctx) -> Any:
    path = ctx.model_dir(lambda config: None)
    (Path(path) / "config.json").write_text("{oops")
    return rope_ntk.load_model(path)


@pytest.mark.parametrize("row", LOAD_ROWS, ids=[r.id for r in LOAD_ROWS])
def test_load_rejects(row, tmp_path, assets):
    ctx = Ctx(tmp_path, assets)
    before = set(assets["lm"].iterdir())
    with pytest.raises(row.error) as info:
        row.call(ctx)
    message = str(info.value)
    for fragment in row.fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in message
    assert set(assets["lm"].iterdir()) == before  # nothing written into a model folder


def test_the_edited_configs_are_otherwise_loadable(tmp_path, assets):
    """The config rows fail for their one bad key: the same edit with good values loads."""
    ctx = Ctx(tmp_path, assets)
    path = ctx.model_dir(_rope(rope_type="yarn", factor=2.0, original_max_position_embeddings=64))
    model, _ = rope_ntk.load_model(path)
    assert model.config.rope_parameters["factor"] == 2.0
    rope_ntk.verify(model)


# ---------------------------------------------------------------- corpora, tasks, windows

DATA_ROWS = [
    Row("corpus-missing", lambda c: rope_ntk.load_corpus(str(c.tmp / "nope.txt")), CorpusError,
        ("corpus=", "nope.txt", "no such file")),
    Row("corpus-empty", lambda c: rope_ntk.load_corpus(c.file("empty.txt", "")), CorpusError,
        ("corpus=", "empty.txt", "holds no text")),
    Row("corpus-blank-jsonl", lambda c: rope_ntk.load_corpus(c.file("blank.jsonl", "\n\n")), CorpusError,
        ("corpus=", "blank.jsonl", "holds no text")),
    Row("corpus-bad-jsonl-line", lambda c: rope_ntk.load_corpus(c.file("bad.jsonl", '{"text": "a"}\n{oops\n')),
        CorpusError, ("bad.jsonl", "line 2 is not JSON")),
    Row("corpus-jsonl-field", lambda c: rope_ntk.load_corpus(c.file("f.jsonl", '{"body": "a"}\n')), CorpusError,
        ("line 1", "no string field 'text'", "--text-field")),
    Row("corpus-too-short", lambda c: pp.windows(list(range(50)), 128, 1, None), CorpusError,
        ("50 tokens", "length=128", "needs 128")),
    Row("window-length-0", lambda c: pp.windows(list(range(500)), 0, 1, None), InvalidParameterError,
        ("length=0", "integer >= 2")),
    Row("window-length-float", lambda c: pp.windows(list(range(500)), 64.5, 1, None), InvalidParameterError,
        ("length=64.5", "integer >= 2")),
    Row("bos-policy", lambda c: pp.resolve_bos(_tokenizer(), "maybe"), InvalidParameterError,
        ("bos='maybe'", "valid: auto, always, never")),
    Row("depth-above-1", lambda c: pk.build_prompt(_tokenizer(), 256, 1.5, "12345"), InvalidParameterError,
        ("depth=1.5", "[0, 1]")),
    Row("depth-negative", lambda c: pk.check_depth(-0.1), InvalidParameterError, ("depth=-0.1", "[0, 1]")),
    Row("depth-string", lambda c: pk.check_depth("0.5"), InvalidParameterError, ("depth='0.5'", "[0, 1]")),
    Row("passkey-length-too-short", lambda c: pk.build_prompt(_tokenizer(), 20, 0.5, "12345"),
        InvalidParameterError, ("length=20", "too short", "needs more than")),
]


@pytest.mark.parametrize("row", DATA_ROWS, ids=[r.id for r in DATA_ROWS])
def test_data_rejects(row, tmp_path, assets):
    ctx = Ctx(tmp_path, assets)
    with pytest.raises(row.error) as info:
        row.call(ctx)
    for fragment in row.fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---------------------------------------------------------------- sweeps (Python): no output left behind

SWEEP_ROWS = [
    Row("sweep-length-0", lambda c: c.sweep(lengths=(0,)), InvalidParameterError, ("length=0", "integer >= 64")),
    Row("sweep-length-string", lambda c: c.sweep(lengths=("128",)), InvalidParameterError,
        ("length='128'", "integer >= 64")),
    Row("sweep-length-float", lambda c: c.sweep(lengths=(128.0,)), InvalidParameterError,
        ("length=128.0", "integer >= 64")),
    Row("sweep-depth", lambda c: c.sweep(depths=(0.5, 1.01)), InvalidParameterError, ("depth=1.01", "[0, 1]")),
    Row("sweep-factor-string", lambda c: c.sweep(factor="2"), InvalidParameterError, ("factor='2'", ">= 1")),
    Row("sweep-ppl-tokens-float", lambda c: c.sweep(ppl_tokens=12.5), InvalidParameterError,
        ("ppl_tokens=12.5", "integer >= 1")),
    Row("sweep-trust-remote-code", lambda c: c.sweep(trust_remote_code="no"), InvalidParameterError,
        ("trust_remote_code='no'", "True or False")),
    Row("sweep-unknown-metric", lambda c: c.sweep(metrics=("perplexity", "rouge")), InvalidParameterError,
        ("metrics=['rouge']", "valid: perplexity, passkey")),
    # these load the tiny model and fail before the first cell
    Row("sweep-corpus-too-short", lambda c: c.sweep(corpus=c.file("short.txt", "A few words only."),
                                                    metrics=("passkey", "perplexity")),
        CorpusError, ("length=128", "tokens", "longer corpus")),
    Row("sweep-empty-corpus", lambda c: c.sweep(corpus=c.file("empty.txt", "  ")), CorpusError,
        ("empty.txt", "holds no text")),
    Row("sweep-no-rotary-model", lambda c: c.sweep(model=str(c.assets["gpt2"]), metrics=("perplexity",)),
        UnsupportedModelError, ("GPT2LMHeadModel", "no rotary embedding")),
    Row("sweep-bad-config", lambda c: c.sweep(model=c.model_dir(_rope(rope_type="linear", factor=-1))),
        InvalidParameterError, ("config.json", "factor=-1", ">= 1")),
]


@pytest.mark.parametrize("row", SWEEP_ROWS, ids=[r.id for r in SWEEP_ROWS])
def test_sweep_rejects_and_leaves_nothing(row, tmp_path, assets):
    ctx = Ctx(tmp_path, assets)
    with pytest.raises(row.error) as info:
        row.call(ctx)
    for fragment in row.fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not (tmp_path / "out").exists()  # not even an empty folder


def test_a_failure_after_some_cells_keeps_them_and_no_temp_files(tmp_path, assets, monkeypatch):
    """A cell that crashes mid-sweep (here: the second perplexity computation raises) leaves
    the finished cells in a parseable file and no temp file; the same call then resumes."""
    calls, real = [], pp.score_windows

    def second_one_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second cell")
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "score_windows", second_one_fails)
    ctx = Ctx(tmp_path, assets)
    with pytest.raises(RuntimeError, match="second cell"):
        ctx.sweep(metrics=("perplexity",))
    out = tmp_path / "out"
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == ["none"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    monkeypatch.setattr(pp, "score_windows", real)
    ctx.sweep(metrics=("perplexity",))
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == ["none", "yarn"]


# ---------------------------------------------------------------- the command line

CLI_ROWS = [
    (["--methods", "none,foo"], ("method='foo'", "valid methods")),
    (["--factor", "nan"], ("factor=nan", ">= 1")),
    (["--factor", "-3"], ("factor=-3", ">= 1")),
    (["--factor", "two"], ("--factor", "'two'")),
    (["--lengths", "0"], ("length=0", ">= 64")),
    (["--lengths", "1e3"], ("--lengths", "'1e3'", "int")),
    (["--depths", "1.5"], ("depth=1.5", "[0, 1]")),
    (["--depths", "-1"], ("depth=-1", "[0, 1]")),
    (["--ppl-tokens", "-5"], ("ppl_tokens=-5", ">= 1")),
    (["--metrics", "bleu"], ("metrics=['bleu']", "valid: perplexity, passkey")),
    (["--model", "{tmp}/gone.gguf"], ("model=", "gone.gguf", "no such GGUF file")),
    (["--model", "{head_gguf}"], ("model=", "head.gguf", "(gguf)")),
    (["--model", "{bad_config}"], ("config.json", "factor=0", ">= 1")),
    (["--model", "{gpt2}", "--metrics", "perplexity"], ("GPT2LMHeadModel", "no rotary embedding")),
    (["--corpus", "{tmp}/gone.txt"], ("corpus=", "gone.txt", "no such file")),
    (["--corpus", "{empty_corpus}"], ("corpus=", "empty.txt", "holds no text")),
    (["--corpus", "{short_corpus}", "--metrics", "perplexity"], ("length=128", "longer corpus")),
]


@pytest.fixture
def cli_args(assets, tmp_path):
    ctx = Ctx(tmp_path, assets)
    names = {
        "tmp": str(tmp_path),
        "head_gguf": ctx.file("head.gguf", _gguf_bytes(ctx)[:30]),
        "bad_config": ctx.model_dir(_rope(rope_type="yarn", factor=0, original_max_position_embeddings=64)),
        "gpt2": str(assets["gpt2"]),
        "empty_corpus": ctx.file("empty.txt", ""),
        "short_corpus": ctx.file("short.txt", "Too short to score."),
    }
    out = tmp_path / "out"
    base = ["--model", str(assets["lm"]), "--corpus", str(assets["corpus"]), "--methods", "none,yarn",
            "--lengths", "128", "--ppl-tokens", "128", "--depths", "0.5", "--dtype", "float32", "--no-plot",
            "--out", str(out)]
    return base, names, out


@pytest.mark.parametrize("bad, fragments", CLI_ROWS, ids=[" ".join(b) for b, _ in CLI_ROWS])
def test_cli_rejects_with_one_line_and_exit_2(bad, fragments, cli_args, capsys):
    base, names, out = cli_args
    status, line = run_main(capsys, *base, *[a.format(**names) for a in bad])
    assert status == 2
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists()


@pytest.mark.parametrize("bad", [["--model", "{head_gguf}"]], ids=["gguf"])
def test_cli_subprocess_prints_no_traceback(bad, cli_args):
    """The same as a user runs it: a real process, one error line, status 2."""
    base, names, out = cli_args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "sweep.py"), *base, *[a.format(**names) for a in bad]],
                          capture_output=True, text=True, env=env, timeout=180)
    line = error_line(done)
    assert "model=" in line
    assert not out.exists()


# TODO: rows for the suite runner's spec files (malformed YAML/JSON, unknown task) and for the
# fine-tuning checkpoints belong here once those land (issues 5 and 6); one row each.
