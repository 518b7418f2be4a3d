"""RULER-style tasks: every generator's prompt fits its length in SmolLM2
tokens, is deterministic, and holds its answer, recomputed here by parsing
the prompt text alone; scoring runs on a tiny Llama."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from evalkit import bundled_tokenizer, tiny_lm_for

import rope_ntk
from rope_ntk.errors import InvalidParameterError
from rope_ntk.evaluation import ruler

SMALL_CWE = {"top_k": 4, "common_freq": 6, "rare_freq": 2}
CASES = [
    ("niah_single", {}),
    ("niah_single", {"value_type": "word", "haystack": "noise"}),
    ("niah_single", {"value_type": "uuid"}),
    ("niah_multikey", {"num_keys": 5}),
    ("niah_multikey", {"num_keys": 4, "num_queries": 3, "value_type": "uuid", "haystack": "noise"}),
    ("niah_multivalue", {"num_values": 3, "value_type": "word"}),
    ("variable_tracking", {}),
    ("variable_tracking", {"num_chains": 3, "num_hops": 2}),
    ("common_words", SMALL_CWE),
]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def essays():
    return rope_ntk.load_corpus("bundled")


def make(task, params, tokenizer, essays, length, trial=0, seed=0):
    params = ruler.validate(task, params)
    ctx = ruler.context_for(task, tokenizer, essays, length, params)
    return ruler.build_prompt(task, ctx, length, params, seed, trial), ctx, params


def parse_answer(task: str, text: str) -> list[str]:
    """The answer from the prompt text alone, by other means than the generator."""
    if task == "variable_tracking":
        asked = re.search(r"assigned the value (\d+), directly", text).group(1)
        value = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", text):
            value[name] = value.get(source, source)  # a name resolves to the number it holds
        return sorted(n for n, v in value.items() if v == asked)
    if task == "common_words":
        k = int(re.search(r"Which (\d+) words occur most often", text).group(1))
        counts = Counter(re.findall(r"^\d+\. ([a-z]+)$", text, flags=re.M))
        ranked = counts.most_common()
        assert ranked[k - 1][1] > ranked[k][1]  # no tie at the cut
        return sorted(w for w, _ in ranked[:k])
    question = text[text.rindex("\n\nWhat") :]
    asked = re.search(r"filed under ([^?]+)\?", question).group(1).split(", ")
    facts = re.findall(r"The (?:number|word|code) filed under (\S+) is ([^\s]+?)\.(?=\s)", text)
    return sorted(v for k, v in facts if k in asked)


@pytest.mark.parametrize("length", [600, 2048])
@pytest.mark.parametrize("task, params", CASES, ids=[f"{t}-{'-'.join(map(str, p.values()))}" for t, p in CASES])
def test_prompt_fits_and_holds_its_answer(tokenizer, essays, task, params, length):
    prompt, ctx, params = make(task, params, tokenizer, essays, length)
    assert prompt.input_ids == tokenizer(prompt.text).input_ids
    n = len(prompt.input_ids)
    assert n <= length
    if task == "common_words":
        slack = params["rare_freq"] * 8 + 4  # one more rare word: rare_freq entries of a few tokens
    else:
        units = prompt.info["units"]
        slack = ctx.haystack.cum[units + 1] - ctx.haystack.cum[units] + 4
    assert n >= length - slack, (n, length, slack)

    assert parse_answer(task, prompt.text) == sorted(prompt.expected)
    # the gold answer lists the expected strings and nothing else
    assert prompt.answer.strip(" .").split(", ") == prompt.expected
    if task.startswith("niah"):
        needles = re.findall(r"The (?:number|word|code) filed under \S+ is ", prompt.text)
        assert len(needles) == params.get("num_keys", 1) * params.get("num_values", 1)
        assert len(prompt.expected) == params.get("num_queries", params.get("num_values", 1))
        for value in prompt.expected:
            if params["value_type"] == "uuid":
                assert UUID.match(value) and prompt.text.count(value) == 1
            elif params["value_type"] == "number":
                assert re.fullmatch(r"\d{7}", value) and prompt.text.count(value) == 1
            else:
                assert value in ctx.words
    if task == "variable_tracking":
        statements = re.findall(r"VAR [A-Z]{5} = \w+\.", prompt.text)
        assert len(statements) == params["num_chains"] * (params["num_hops"] + 1)
        assert len(prompt.expected) == params["num_hops"] + 1
    if task == "common_words":
        counts = Counter(re.findall(r"^\d+\. ([a-z]+)$", prompt.text, flags=re.M))
        assert {counts[w] for w in prompt.expected} == {params["common_freq"]}
        assert set(counts.values()) == {params["common_freq"], params["rare_freq"]}
        assert len(counts) == params["top_k"] + prompt.info["rare_words"]


@pytest.mark.parametrize("task, params", CASES[::2])
def test_prompts_are_deterministic_and_differ_per_trial(tokenizer, essays, task, params):
    a, _, _ = make(task, params, tokenizer, essays, 800, trial=0)
    b, _, _ = make(task, params, tokenizer, essays, 800, trial=0)
    c, _, _ = make(task, params, tokenizer, essays, 800, trial=1)
    d, _, _ = make(task, params, tokenizer, essays, 800, trial=0, seed=1)
    assert a.text == b.text and a.input_ids == b.input_ids
    assert c.expected != a.expected and d.expected != a.expected


def test_chat_template(tokenizer, essays):
    prompt, _, _ = make("variable_tracking", {"chat_template": True}, tokenizer, essays, 1000)
    assert len(prompt.input_ids) <= 1000
    assert prompt.text.startswith("<|im_start|>")
    assert re.search(r"<\|im_start\|>assistant\nThe variables assigned \d+ are:$", prompt.text)
    assert parse_answer("variable_tracking", prompt.text) == sorted(prompt.expected)


@pytest.mark.parametrize(
    "task, params, fragment",
    [
        ("niah_multikey", {"num_keys": 0}, "num_keys=0"),
        ("niah_multikey", {"num_keys": 2, "num_queries": 3}, "num_queries=3"),
        ("niah_multivalue", {"num_values": 0}, "num_values=0"),
        ("niah_single", {"value_type": "float"}, "value_type='float'"),
        ("niah_single", {"num_keys": 2}, "num_keys"),
        ("variable_tracking", {"num_chains": 0}, "num_chains=0"),
        ("variable_tracking", {"num_hops": -1}, "num_hops=-1"),
        ("common_words", {"common_freq": 3, "rare_freq": 3}, "rare_freq=3"),
        ("common_words", {"top_k": 1.5}, "top_k=1.5"),
        ("qa_hotpot", {}, "task='qa_hotpot'"),
    ],
)
def test_bad_params_name_the_argument(task, params, fragment):
    with pytest.raises(InvalidParameterError) as info:
        ruler.validate(task, params)
    assert fragment in str(info.value)


@pytest.mark.parametrize("task", list(ruler.DEFAULTS))
def test_too_short_length_names_the_length(tokenizer, essays, task):
    with pytest.raises(InvalidParameterError, match="length=60 is too short"):
        make(task, {}, tokenizer, essays, 60)


def test_registry_matches_the_task_interface():
    for name, task in ruler.RULER_TASKS.items():
        assert task.validate({}) == task.defaults == ruler.DEFAULTS[name]
        assert "accuracy" not in task.defaults


def test_run_on_a_tiny_model(tokenizer, essays):
    model = tiny_lm_for(tokenizer, max_position_embeddings=1024)
    for task, params in [("niah_multivalue", {"num_values": 2}), ("common_words", SMALL_CWE)]:
        out = {}
        for way in ("generate", "teacher-forcing"):
            out[way] = ruler.RULER_TASKS[task].run(
                model, tokenizer, essays, 512, {**params, "trials": 2, "scoring": way}, seed=0
            )
            json.dumps(out[way], allow_nan=False)
            result = out[way]
            assert result["trials"] == 2 and result["task"] == task
            assert result["accuracy"] == sum(t["score"] for t in result["details"]) / 2
            for t in result["details"]:
                assert t["score"] == sum(t["found"]) / len(t["expected"])
        for g, t in zip(out["generate"]["details"], out["teacher-forcing"]["details"]):
            assert g["expected"] == t["expected"]
            # the first expected string forced as argmax => greedy decoding writes it
            assert not t["found"][0] or g["found"][0]
