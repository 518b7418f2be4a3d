"""Save a patched model, load it back: same logits.

Native methods reload in plain transformers — checked in a subprocess that
never imports rope_ntk — from the 5.x ``rope_parameters`` config and from the
4.x ``rope_theta`` + ``rope_scaling`` one. Methods transformers cannot
express reload unscaled there, and scaled through ``rope_ntk.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_families import longrope_lists
from test_parity_transformers import assert_logits_close
from tiny import TRANSFORMERS_4, logits_of, make_family_config, make_model, token_ids

import rope_ntk
from rope_ntk import InvalidParameterError, methods

IDS = token_ids(150, seed=5)

# (case id, family, method, params, schema) -- all native
NATIVE = [
    ("llama-linear-5x", "llama", "linear", {"factor": 2}, "5.x"),
    ("llama-linear-4x", "llama", "linear", {"factor": 2}, "4.x"),
    ("llama-ntk-4x", "llama", "ntk", {"alpha": 3.0}, "4.x"),
    ("llama-ntk-5x", "llama", "ntk", {"alpha": 3.0}, "5.x"),
    ("llama-dynamic-5x", "llama", "dynamic-ntk", {"factor": 2.0}, "5.x"),
    ("llama-dynamic-4x", "llama", "dynamic-ntk", {"factor": 2.0}, "4.x"),
    ("llama-yarn-mscale-5x", "llama", "yarn", {"factor": 4, "mscale": 0.9}, "5.x"),
    ("llama-yarn-4x", "llama", "yarn", {"factor": 4.0, "beta_fast": 16}, "4.x"),
    ("llama-by-parts-5x", "llama", "ntk-by-parts", {"factor": 4.0}, "5.x"),
    ("llama-llama3-5x", "llama", "llama3", {"factor": 4.0}, "5.x"),
    ("llama-llama3-4x", "llama", "llama3", {"factor": 4.0}, "4.x"),
    ("llama-longrope-4x", "llama", "longrope", longrope_lists(8), "4.x"),
    ("phi-yarn-4x", "phi", "yarn", {"factor": 4.0}, "4.x"),
    ("phi3-longrope-5x", "phi3", "longrope", longrope_lists(8), "5.x"),
    # Phi-3's 4.x config derives longrope's factor (max_position_embeddings / original = 1 here): none given
    ("phi3-longrope-4x", "phi3", "longrope", {k: v for k, v in longrope_lists(8).items() if k != "factor"}, "4.x"),
    ("gemma3-yarn-5x", "gemma3_text", "yarn", {"factor": 4.0}, "5.x"),
    ("gemma3-yarn-4x", "gemma3_text", "yarn", {"factor": 4.0}, "4.x"),
    ("gpt-neox-ntk-4x", "gpt_neox", "ntk", {"alpha": 2.0}, "4.x"),
    ("olmo-linear-4x", "olmo", "linear", {"factor": 2.0}, "4.x"),
    ("deepseek-yarn-mscale-5x", "deepseek_v3", "yarn", {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}, "5.x"),
    ("deepseek-yarn-mscale-4x", "deepseek_v3", "yarn", {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}, "4.x"),
    ("llama-yarn-mscale-4x", "llama", "yarn", {"factor": 4, "mscale": 0.9}, "4.x"),
    ("llama-by-parts-4x", "llama", "ntk-by-parts", {"factor": 4.0}, "4.x"),
]
# (case id, family, method, params) -- transformers cannot express these
NOT_NATIVE = [
    ("llama-dynamic-yarn", "llama", "dynamic-yarn", {"factor": 4.0}),
    ("llama-dynamic-other-original", "llama", "dynamic-ntk", {"factor": 2.0, "original_max_position_embeddings": 40}),
    ("gptj-yarn", "gptj", "yarn", {"factor": 4.0}),
    ("phi3-linear", "phi3", "linear", {"factor": 2.0}),
]

PLAIN_LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
ids = torch.load(sys.argv[1])
for directory in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids, use_cache=False).logits, directory + "/plain_logits.pt")
assert "rope_ntk" not in sys.modules
"""


def skip_reason(family: str, schema: str | None) -> str | None:
    """Why a case cannot run on the installed transformers, or None."""
    if TRANSFORMERS_4 and schema == "5.x":
        return "transformers 4.x cannot write or read the 5.x rope_parameters schema"
    if TRANSFORMERS_4 and family == "gptj":
        return "transformers 4.x's GPT-J has no rotary module for rope_ntk to patch (tests/test_families.py)"
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Patch, record logits, save; then reload every directory once in plain transformers."""
    root = tmp_path_factory.mktemp("saved")
    cases = {}
    # NOT_NATIVE cases: the installed transformers' schema
    for case, family, method, params, schema in NATIVE + [(*c, None) for c in NOT_NATIVE]:
        if skip_reason(family, schema):
            continue
        stock = make_model(make_family_config(family))
        # stock GPT-J reads a sin/cos table of max_position_embeddings rows: it cannot run 150 tokens at all
        unscaled = None if family == "gptj" else logits_of(stock, IDS)
        # plain transformers reloads the legacy mode (every token scaled for the whole length)
        rope_ntk.patch(stock, method, **({"cache_consistent": False} if schema is not None else {}), **params)
        directory = rope_ntk.save_pretrained(stock, root / case, schema=schema)
        cases[case] = (directory, unscaled, logits_of(stock, IDS), stock)
    torch.save(IDS, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, str(root / "ids.pt"), *[str(d) for d, u, *_ in cases.values() if u is not None]],
        check=True, env=env, cwd=root,
    )
    return cases


@pytest.mark.parametrize("case,family,method,params,schema", NATIVE, ids=[c[0] for c in NATIVE])
def test_native_patch_reloads_in_plain_transformers(saved, case, family, method, params, schema):
    if skip_reason(family, schema):
        pytest.skip(skip_reason(family, schema))
    directory, unscaled, patched, model = saved[case]
    written = json.loads((directory / "config.json").read_text())
    assert ("rope_scaling" in written) == (schema == "4.x")
    assert ("rope_parameters" in written) == (schema == "5.x")
    assert written["rope_ntk"]["method"] == method and written["rope_ntk"]["native"] is True
    plain = torch.load(directory / "plain_logits.pt")
    assert (patched - unscaled).abs().max() > 1e-3 * patched.abs().max()  # the patch matters here
    assert_logits_close(plain, patched)


@pytest.mark.parametrize("case,family,method,params", NOT_NATIVE, ids=[c[0] for c in NOT_NATIVE])
def test_non_native_patch_is_reapplied_by_rope_ntk(saved, case, family, method, params):
    if skip_reason(family, None):
        pytest.skip(skip_reason(family, None))
    directory, unscaled, patched, model = saved[case]
    written = json.loads((directory / "config.json").read_text())
    assert written["rope_ntk"]["native"] is False and written["rope_ntk"]["method"] == method
    if unscaled is not None:  # plain transformers gets the unscaled model
        assert_logits_close(torch.load(directory / "plain_logits.pt"), unscaled)
    reloaded = rope_ntk.from_pretrained(directory)
    assert rope_ntk.describe(reloaded)[0]["method"] == method
    assert torch.equal(logits_of(reloaded, IDS), patched)


def test_reloaded_patch_does_not_stack(saved):
    """A reloaded ntk model records rope_theta' = base * alpha**(d/(d-2)); re-patching starts from the base."""
    directory, unscaled, patched, model = saved["llama-ntk-4x" if TRANSFORMERS_4 else "llama-ntk-5x"]
    reloaded = rope_ntk.from_pretrained(directory)
    (entry,) = rope_ntk.describe(reloaded)
    assert entry["rope_theta"] == 10_000.0 and entry["params"] == {"alpha": 3.0}
    assert_logits_close(logits_of(reloaded, IDS), patched)
    rope_ntk.patch(reloaded, "none")
    assert_logits_close(logits_of(reloaded, IDS), unscaled)


def test_save_rejects_unknown_schema(tmp_path, llama):
    with pytest.raises(InvalidParameterError, match=r"schema='3.x'.*valid: 5.x, 4.x"):
        rope_ntk.save_pretrained(llama, tmp_path, schema="3.x")


# ---------------------------------------------------------------- reading transformers' dicts


@pytest.mark.parametrize(
    "rope,method,params",
    [
        ({"type": "linear", "factor": 2}, "linear", {"factor": 2.0}),
        ({"rope_type": "linear", "factor": 2.0}, "linear", {"factor": 2.0}),
        ({"type": "yarn", "rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32},
         "yarn", {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                  "truncate": True}),
        ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "rope_theta": 5e5},
         "llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        ({"rope_type": "default", "rope_theta": 1e4}, "none", {}),
    ],
)
def test_from_hf_reads_both_schemas(rope, method, params):
    got_method, got_params = methods.from_hf(rope)
    assert got_method.name == method
    assert got_params == params
    assert all(type(v) is type(params[k]) for k, v in got_params.items())  # ints became floats


def test_patch_from_hf_dynamic_measures_against_max_position_embeddings(llama):
    native = make_model(make_family_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                     "rope_theta": 10_000.0}))
    native.load_state_dict(llama.state_dict())
    rope_ntk.patch_from_hf(llama, {"type": "dynamic", "factor": 2}, "rope_scaling", cache_consistent=False)
    assert rope_ntk.describe(llama)[0]["original_max_position_embeddings"] == llama.config.max_position_embeddings
    assert_logits_close(logits_of(llama, IDS), logits_of(native, IDS))


@pytest.mark.parametrize(
    "rope,fragments",
    [
        ({"type": "linear"}, ["rope_scaling", "'linear'", "needs factor"]),
        ({"type": "linear", "factor": "2"}, ["rope_scaling", "factor='2'"]),
        ({"type": "yarn", "factor": 4, "beta_fastt": 3}, ["rope_scaling", "beta_fastt=3"]),
        ({"type": "su", "factor": 4}, ["rope_scaling['rope_type']='su'", "valid: default, linear"]),
        ({"type": "yarn", "rope_type": "linear", "factor": 2}, ["rope_scaling['rope_type']='linear'", "['type']='yarn'"]),
        ([("type", "linear")], ["rope_scaling=[('type', 'linear')]", "must be a dict"]),
    ],
)
def test_from_hf_errors_name_the_key(rope, fragments):
    with pytest.raises(InvalidParameterError) as info:
        methods.from_hf(rope, "rope_scaling")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_apply_recorded_rejects_a_malformed_record(llama):
    llama.config.rope_ntk = {"method": 3}
    with pytest.raises(InvalidParameterError, match=r"config.rope_ntk=\{'method': 3\}.*'method'"):
        rope_ntk.apply_recorded(llama)
    assert not rope_ntk.is_patched(llama)


def test_gemma3_scaled_local_layers_have_no_4x_schema(tmp_path):
    """4.x builds Gemma 3's local RoPE unscaled from rope_local_base_freq: saying otherwise is refused."""
    model = make_model(make_family_config("gemma3_text"))
    rope_ntk.patch(model, "linear", factor=2.0, layer_types=["sliding_attention", "full_attention"])
    if TRANSFORMERS_4:  # transformers writes the config: unscaled, the patch recorded for rope_ntk to reapply
        written = json.loads((rope_ntk.save_pretrained(model, tmp_path) / "config.json").read_text())
        assert written["rope_ntk"]["native"] is False and written["rope_scaling"] is None
        return
    with pytest.raises(InvalidParameterError, match=r"schema='4.x' cannot express a scaled 'sliding_attention'"):
        rope_ntk.save_pretrained(model, tmp_path, schema="4.x")
