"""Determinism: the same seed gives the same passkey prompts, the same documents
and windows, and the same results on a tiny model; another seed other keys.
Keys are compared across interpreters with different hash seeds, so nothing
depends on Python's per-process string hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from evalkit import bundled_tokenizer, write_corpus

import rope_ntk
from rope_ntk.evaluation import passkey as pk
from rope_ntk.evaluation import perplexity as pp
from rope_ntk.evaluation.sweep import SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parent.parent
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
KEYS_SCRIPT = (
    "import json; from rope_ntk.evaluation.passkey import trial_keys; "
    f"print(json.dumps([trial_keys(s, L, {DEPTHS!r}) for s in (0, 1, 7) for L in (128, 4096)]))"
)


def _keys_in_a_fresh_interpreter(hash_seed: str) -> list:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KEYS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_passkey_keys_depend_on_the_seed_only():
    here = [pk.trial_keys(s, L, DEPTHS) for s in (0, 1, 7) for L in (128, 4096)]
    assert _keys_in_a_fresh_interpreter("12345") == here  # another hash seed than this process's
    flat = [k for keys in here for k in keys]
    assert all(len(k) == 5 and k.isdigit() for k in flat)
    assert len(set(flat)) > len(flat) * 0.9  # another seed or length: other keys
    assert pk.trial_keys(0, 128, DEPTHS) != pk.trial_keys(1, 128, DEPTHS)


def test_same_seed_same_prompts():
    tokenizer = bundled_tokenizer()
    for depth, key in zip(DEPTHS, pk.trial_keys(3, 300, DEPTHS)):
        first, again = pk.build_prompt(tokenizer, 300, depth, key), pk.build_prompt(tokenizer, 300, depth, key)
        assert first == again
        assert first.input_ids == tokenizer(first.text).input_ids and len(first.input_ids) <= 300
        assert f"The pass key is {key}." in first.text


def test_same_documents_and_windows(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", words=2000)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in corpus.read_text().split("\n\n")) + "\n")
    tokenizer = bundled_tokenizer()
    for source in (corpus, jsonl):
        docs = rope_ntk.load_corpus(str(source))
        assert docs == rope_ntk.load_corpus(str(source))  # same documents, same order
        stream = pp.tokenize_stream(tokenizer, docs, 1000)
        assert stream == pp.tokenize_stream(tokenizer, list(docs), 1000)
        for bos in (None, tokenizer.bos_token_id or 0):
            assert pp.windows(stream, 128, 5, bos) == pp.windows(list(stream), 128, 5, bos)
    # the jsonl documents are the text's paragraphs, in order
    assert rope_ntk.load_corpus(str(jsonl)) == corpus.read_text().split("\n\n")


def test_same_seed_same_results(tiny_assets, tmp_path):
    model, corpus = tiny_assets

    def run(out: Path, seed: int) -> list[dict]:
        config = SweepConfig(model=str(model), corpus=str(corpus), methods=("none", "dynamic-yarn"),
                             lengths=(128, 256), ppl_tokens=256, depths=(0.5, 1.0), dtype="float32", seed=seed)
        run_sweep(config, out, plot=False)
        records = json.loads((out / "results.json").read_text())["records"]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    first, second, other = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 5)
    assert first == second  # every value, nll_sum, continuation and key, exactly
    keys = [t["key"] for r in first if r["metric"] == "passkey_accuracy" for t in r["details"]]
    other_keys = [t["key"] for r in other if r["metric"] == "passkey_accuracy" for t in r["details"]]
    assert keys != other_keys
    # perplexity does not depend on the seed: the same windows are scored
    ppl = [r["nll_sum"] for r in first if r["metric"] == "perplexity"]
    assert ppl == [r["nll_sum"] for r in other if r["metric"] == "perplexity"]
