"""torch.compile of a patched model gives the eager logits (issue 7).

The static rotary module compiles into one graph (``fullgraph=True``: no
graph break, so no Python fallback inside it); a whole patched tiny Llama
compiled with inductor matches its eager forward. Skipped, with the reason,
where inductor cannot run: it needs a C compiler to build its kernels.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import rope_ntk
from rope_ntk import methods
from rope_ntk.rotary import ScaledRotaryEmbedding
from tiny import LONG, ORIGINAL, logits_of, make_config, make_model, token_ids

COMPILER = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(COMPILER is None, reason="torch.compile (inductor) needs a C compiler; none on PATH")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_static_rotary_module_compiles_without_graph_breaks():
    rope = methods.ModelRope(10000.0, 16, ORIGINAL, ORIGINAL)
    module = ScaledRotaryEmbedding("yarn", {"factor": 4.0}, rope)
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    positions = torch.arange(3 * ORIGINAL)[None]
    compiled = torch.compile(module, fullgraph=True)  # raises on any graph break
    for want, got in zip(module(x, positions), compiled(x, positions)):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2)


@torch.no_grad()
def test_compiled_patched_model_matches_eager():
    model = make_model(make_config("llama", num_hidden_layers=1))
    rope_ntk.patch(model, "yarn", factor=4.0)
    ids = token_ids(LONG)  # past the original context, where the scaling matters
    eager = logits_of(model, ids)
    compiled = torch.compile(model)
    got = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    # the patch is really in the compiled graph: the unpatched model differs by far more
    rope_ntk.unpatch(model)
    assert (logits_of(model, ids) - got).abs().max() > 1e-2
