"""Shared fixtures: tiny, seeded, float32 Llama / Mistral / Qwen2 models (see tiny.py).

Torch runs on one thread here: tiny matmuls gain nothing from more, on a
busy two-core machine two threads made the 135M-model forward 3x slower, and
several tests compare logits bit for bit, which one fixed thread keeps
reproducible. ``ROPE_NTK_TEST_THREADS`` overrides it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import FAMILIES, LONG, ORIGINAL, make_config, make_model, token_ids  # noqa: E402

torch.set_num_threads(int(os.environ.get("ROPE_NTK_TEST_THREADS", "1")))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    """A fresh tiny model of each family (function scope: tests may patch it)."""
    return make_model(make_config(family))


@pytest.fixture
def llama():
    """A fresh tiny Llama, for tests that need only one family."""
    return make_model(make_config("llama"))


@pytest.fixture(scope="session")
def long_ids() -> torch.Tensor:
    """``[1, LONG]`` token ids, seeded; LONG > ORIGINAL."""
    return token_ids(LONG)


@pytest.fixture(scope="session")
def short_ids() -> torch.Tensor:
    """``[1, ORIGINAL]`` token ids: exactly the original context."""
    return token_ids(ORIGINAL, seed=2)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """(model folder, corpus file): a tiny seeded Llama saved with the bundled
    tokenizer and a few thousand words of text (``evalkit``), built once for
    the session; tests read them and write their outputs elsewhere."""
    from evalkit import save_tiny_lm, write_corpus

    root = tmp_path_factory.mktemp("tiny-assets")
    return save_tiny_lm(root / "tiny-lm"), write_corpus(root / "corpus.txt")
