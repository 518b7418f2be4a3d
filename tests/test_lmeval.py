"""The lm-evaluation-harness wrapper on a tiny saved model and local tasks.

The tasks (tests/data/lmeval/*.yaml) read local jsonl files; nothing here
touches the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from evalkit import save_tiny_lm

import rope_ntk

lm_eval = pytest.importorskip("lm_eval", reason="the optional extra 'lmeval' (lm-eval) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from rope_ntk import lmeval  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lmeval"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lmeval") / "tiny-lm")


@pytest.fixture(scope="module")
def wrapped(tiny_dir):
    return lmeval.RopeNtkLM(pretrained=str(tiny_dir), method="yarn", factor=4, dtype="float32")


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) from one forward of ``model``."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    target = whole[len(context_ids):]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, len(whole) - 1)  # position i predicts token i + 1
    return sum(logprobs[i, t].item() for i, t in zip(positions, target))


PAIRS = [("The sky on a clear day is", " blue"), ("Count: one, two, three,", " four five"),
         ("A cat usually has four", " legs")]


def test_loglikelihood_is_that_of_the_patched_model(wrapped, tiny_dir):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = [ll for ll, _ in wrapped.loglikelihood(requests)]

    model, tokenizer = rope_ntk.load_model(str(tiny_dir), dtype="float32")
    plain = [direct_loglikelihood(model, tokenizer, *pair) for pair in PAIRS]
    with rope_ntk.patch(model, "yarn", factor=4):
        scaled = [direct_loglikelihood(model, tokenizer, *pair) for pair in PAIRS]
    assert got == pytest.approx(scaled, abs=1e-5)
    assert all(abs(g - p) > 1e-4 for g, p in zip(got, plain))  # the patch is in effect (a 1-layer random model moves little)
    assert wrapped.max_length == 4 * 128  # the scaled context: original (128) x factor
    assert wrapped.get_model_info()["rope_ntk"] == {"method": "yarn", "params": {"factor": 4}}


def test_simple_evaluate_runs_local_tasks_on_the_patched_model(wrapped, tiny_dir, monkeypatch):
    monkeypatch.chdir(TASKS)  # the task YAMLs name their jsonl files relative to this folder
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = lm_eval.simple_evaluate(model=wrapped, tasks=["rope_ntk_tiny_choice", "rope_ntk_tiny_gen"],
                                  task_manager=manager, log_samples=True)

    model, tokenizer = rope_ntk.load_model(str(tiny_dir), dtype="float32")
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    with rope_ntk.patch(model, "yarn", factor=4):
        hits = []
        for doc in docs:
            scores = [direct_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
            hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        prompt = json.loads((TASKS / "tiny_gen.jsonl").read_text().splitlines()[0])["prompt"]
        ids = torch.tensor([tokenizer(prompt).input_ids])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
    assert out["results"]["rope_ntk_tiny_choice"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    first = next(s for s in out["samples"]["rope_ntk_tiny_gen"] if s["doc_id"] == 0)
    assert first["resps"][0][0].split("\n")[0] == expected


@pytest.mark.parametrize(
    "args, fragments",
    [
        ({"method": "yarn", "factr": 2}, ["factr=2", "valid: factor", "HFLM argument", "batch_size"]),
        ({"method": "yarn", "factor": 0.5}, ["factor=0.5", ">= 1"]),
        ({"method": "nope"}, ["method='nope'", "valid methods"]),
    ],
)
def test_bad_model_args_are_refused_before_loading(args, fragments):
    with pytest.raises(rope_ntk.InvalidParameterError) as info:
        lmeval.RopeNtkLM(pretrained="/nonexistent", **args)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_model_args_split_and_list_parameters():
    assert lmeval.split_args(None, {"batch_size": 2}) == ("none", {}, {"batch_size": 2})
    name, params, hf = lmeval.split_args("longrope", {"short_factor": "1;1.5", "long_factor": "2;3", "max_length": 64})
    assert (name, params, hf) == ("longrope", {"short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}, {"max_length": 64})


@pytest.mark.real_model
def test_lm_eval_on_the_bundled_model_by_name(monkeypatch):
    """One short run on the bundled model, YaRN x2, bf16, through lm_eval's own
    model-name and model-args path (what ``eval/lmeval.py --model rope_ntk
    --model_args ...`` takes), without indexing lm_eval's thousands of tasks."""
    monkeypatch.chdir(TASKS)
    out = lm_eval.simple_evaluate(
        model="rope_ntk", model_args="pretrained=bundled,method=yarn,factor=2,dtype=bfloat16", device="cpu",
        tasks=["rope_ntk_tiny_choice"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
    )
    assert out["results"]["rope_ntk_tiny_choice"]["acc,none"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert out["config"]["model"] == "rope_ntk"
    assert out["config"]["model_args"] == "pretrained=bundled,method=yarn,factor=2,dtype=bfloat16"
