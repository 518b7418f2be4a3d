"""Passkey retrieval: prompts built with the real SmolLM2 tokenizer (read
from the bundled GGUF file; the model weights are not loaded), answers,
keys, and trials on a tiny Llama sharing that tokenizer's vocabulary."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from evalkit import bundled_tokenizer, tiny_lm_for

from rope_ntk.errors import InvalidParameterError
from rope_ntk.evaluation import passkey as pk

LENGTHS = (256, 1000, 4096)
DEPTHS = (0, 0.25, 0.5, 1)
KEY = "48213"


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def unit(tokenizer) -> int:
    """Tokens one more filler unit costs (the first one may merge differently)."""
    return max(_count(tokenizer, pk.FILLER), _count(tokenizer, pk.FILLER * 2) - _count(tokenizer, pk.FILLER))


def _parts(prompt: pk.PasskeyPrompt) -> tuple[int, int]:
    """(filler units before the needle, after it), checking the prompt's layout."""
    needle = pk.NEEDLE.format(key=prompt.key)
    text = prompt.text
    assert text.startswith(pk.INSTRUCTION)
    assert text.endswith(pk.QUESTION)
    assert text.count(needle) == 1
    body = text[len(pk.INSTRUCTION) : len(text) - len(pk.QUESTION)]
    before, _, after = body.partition(needle)
    n_before, rest_before = divmod(len(before), len(pk.FILLER))
    n_after, rest_after = divmod(len(after), len(pk.FILLER))
    assert (rest_before, rest_after) == (0, 0)
    assert before == pk.FILLER * n_before and after == pk.FILLER * n_after
    return n_before, n_after


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_fits_the_length_and_holds_the_key_at_its_depth(tokenizer, unit, length, depth):
    prompt = pk.build_prompt(tokenizer, length, depth, KEY)
    assert prompt.key == KEY and prompt.depth == depth and isinstance(prompt.depth, float)
    assert prompt.input_ids == tokenizer(prompt.text).input_ids
    n = len(prompt.input_ids)
    assert n <= length
    # nearly full: less than two filler units (plus merges at the joins) short
    assert n >= length - 2 * unit - 3, (n, length, unit)

    # the key is the only number in the prompt, and only in the needle line
    assert re.findall(r"\d+", prompt.text) == [KEY, KEY]
    assert prompt.text.count(pk.NEEDLE.format(key=KEY)) == 1

    # the needle sits at `depth` of the filler: 0 = start, 1 = end
    n_before, n_after = _parts(prompt)
    total = n_before + n_after
    assert total >= 1
    assert abs(n_before - depth * total) <= 1
    if depth == 0:
        assert n_before == 0
    if depth == 1:
        assert n_after == 0
    filler_chars = total * len(pk.FILLER)
    needle_at = prompt.text.index(pk.NEEDLE.format(key=KEY)) - len(pk.INSTRUCTION)
    assert abs(needle_at / filler_chars - depth) <= 1 / total + 1e-12


def test_prompt_budget_near_the_minimum_length(tokenizer, unit):
    """Short lengths, where the first estimate of the filler may not fit."""
    fixed = len(tokenizer(pk.INSTRUCTION + pk.NEEDLE.format(key=KEY) + pk.QUESTION).input_ids)
    for length in range(fixed + unit, fixed + 4 * unit, 3):
        for depth in (0, 0.5, 1):
            prompt = pk.build_prompt(tokenizer, length, depth, KEY)
            n = len(prompt.input_ids)
            assert length - 2 * unit - 3 <= n <= length, (length, depth, n)
            n_before, n_after = _parts(prompt)
            assert abs(n_before - depth * (n_before + n_after)) <= 1


def test_prompt_is_the_longest_that_fits(tokenizer):
    too_short = []
    for length in LENGTHS:
        for depth in DEPTHS:
            prompt = pk.build_prompt(tokenizer, length, depth, KEY)
            n_before, n_after = _parts(prompt)
            total = n_before + n_after + 1
            before = round(total * depth)
            longer = (
                pk.INSTRUCTION + pk.FILLER * before + pk.NEEDLE.format(key=KEY) + pk.FILLER * (total - before)
                + pk.QUESTION
            )
            if len(tokenizer(longer).input_ids) <= length:
                too_short.append((length, depth, len(prompt.input_ids)))
    assert not too_short, f"one more filler unit still fits for (length, depth, tokens) {too_short}"


def test_different_keys_give_prompts_of_the_same_shape(tokenizer):
    a = pk.build_prompt(tokenizer, 1000, 0.5, "11111")
    b = pk.build_prompt(tokenizer, 1000, 0.5, "98765")
    assert _parts(a) == _parts(b)
    assert a.text.replace("11111", "98765") == b.text


def test_too_short_length_names_the_length_and_the_minimum(tokenizer):
    with pytest.raises(InvalidParameterError) as info:
        pk.build_prompt(tokenizer, 50, 0.5, KEY)
    message = str(info.value)
    assert "length=50" in message
    minimum = int(re.search(r"more than (\d+) tokens", message).group(1))
    fixed = len(tokenizer(pk.INSTRUCTION + pk.NEEDLE.format(key=KEY) + pk.QUESTION).input_ids)
    assert minimum >= fixed
    with pytest.raises(InvalidParameterError, match=f"length={minimum}"):
        pk.build_prompt(tokenizer, minimum, 0.5, KEY)
    prompt = pk.build_prompt(tokenizer, minimum + 1, 0, KEY)
    assert len(prompt.input_ids) <= minimum + 1
    assert _parts(prompt)[1] >= 1  # one filler unit fits after the key


@pytest.mark.parametrize("depth", [-0.1, 1.0001, math.nan, math.inf, -math.inf, "0.5", None, True, [0.5]])
def test_bad_depths_name_the_depth(tokenizer, depth):
    for call in (lambda: pk.check_depth(depth), lambda: pk.build_prompt(tokenizer, 256, depth, KEY)):
        with pytest.raises(InvalidParameterError) as info:
            call()
        assert f"depth={depth!r}" in str(info.value)


@pytest.mark.parametrize("depth", [0, 1, 0.0, 1.0, 0.3])
def test_valid_depths(depth):
    assert pk.check_depth(depth) == float(depth)


@pytest.mark.parametrize(
    "continuation, answer",
    [
        (" 48213.", "48213"),
        ("48213", "48213"),
        (" is 48213. Remember", "48213"),
        ("\n\nThe pass key is 1234 and 5678", "1234"),
        (" 482130", "482130"),  # a longer number is not the key
        (" 48 213", "48"),
        (" -7", "7"),
        (" no idea", ""),
        ("", ""),
    ],
)
def test_extract_answer(continuation, answer):
    assert pk.extract_answer(continuation) == answer


# ---------------------------------------------------------------- keys


def test_trial_keys_are_a_function_of_seed_and_length():
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    keys = pk.trial_keys(0, 4096, depths)
    assert len(keys) == len(depths)
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert pk.trial_keys(0, 4096, depths) == keys
    assert pk.trial_keys(0, 4096, [0.9, 0.7, 0.5, 0.3, 0.1]) == keys  # not the depth values
    assert pk.trial_keys(1, 4096, depths) != keys
    assert pk.trial_keys(0, 8192, depths) != keys
    assert len({tuple(pk.trial_keys(seed, 4096, depths)) for seed in range(20)}) == 20


def test_trial_keys_are_the_same_in_another_process():
    """Resumed runs are new processes: keys must not depend on hash randomisation."""
    code = "from rope_ntk.evaluation.passkey import trial_keys; print(trial_keys(3, 2048, [0.1, 0.5, 0.9]))"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout.strip())
    assert outputs == {str(pk.trial_keys(3, 2048, [0.1, 0.5, 0.9]))}


# ---------------------------------------------------------------- trials


class ScriptedLM(torch.nn.Module):
    """``generate`` appends the tokens of a fixed reply to the prompt."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply = tokenizer(reply, add_special_tokens=False).input_ids
        self.calls = []

    def generate(self, ids, **kwargs):
        self.calls.append(kwargs)
        new = torch.tensor([self.reply[: kwargs["max_new_tokens"]]], dtype=ids.dtype)
        return torch.cat([ids, new], dim=1)


@pytest.mark.parametrize(
    "reply, answer",
    [(f" {KEY}. It was easy.", KEY), (" 12345.", "12345"), (" I do not know.", ""), (f" {KEY}0", KEY + "0")],
)
def test_run_trial_judges_only_the_continuation(tokenizer, reply, answer):
    prompt = pk.build_prompt(tokenizer, 256, 0.25, KEY)
    model = ScriptedLM(tokenizer, reply)
    trial = pk.run_trial(model, tokenizer, prompt)
    # the prompt itself holds the key: it must not count as the answer
    assert trial["continuation"] == tokenizer.decode(model.reply[:10], skip_special_tokens=True)
    assert trial["answer"] == answer
    assert trial["correct"] is (answer == KEY)
    assert trial["key"] == KEY
    assert trial["depth"] == 0.25
    assert trial["prompt_tokens"] == len(prompt.input_ids)
    (kwargs,) = model.calls
    assert kwargs["max_new_tokens"] == 10
    assert kwargs["do_sample"] is False
    assert torch.equal(kwargs["attention_mask"], torch.ones(1, len(prompt.input_ids), dtype=torch.long))


def test_run_trial_on_a_tiny_model_is_greedy_decoding(tokenizer):
    model = tiny_lm_for(tokenizer, max_position_embeddings=512)
    prompt = pk.build_prompt(tokenizer, 256, 0.5, KEY)
    trial = pk.run_trial(model, tokenizer, prompt, max_new_tokens=6)

    assert set(trial) == {"depth", "key", "answer", "continuation", "prompt_tokens", "correct"}
    assert trial["prompt_tokens"] == len(prompt.input_ids)
    assert trial["answer"] == pk.extract_answer(trial["continuation"])
    assert trial["correct"] == (trial["answer"] == KEY)

    # independent greedy decoding: full forward, argmax, stop at EOS
    ids = list(prompt.input_ids)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    expected = tokenizer.decode(ids[len(prompt.input_ids) :], skip_special_tokens=True)
    assert trial["continuation"] == expected


# ---------------------------------------------------------------- the grid task and its summaries

from rope_ntk.evaluation import summaries  # noqa: E402


def test_chat_template_prompt_fits_and_keeps_the_key(tokenizer):
    for length in (256, 1000):
        prompt = pk.build_prompt(tokenizer, length, 0.5, KEY, chat_template=True)
        assert len(prompt.input_ids) <= length
        assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=False).input_ids
        assert prompt.text.count(pk.NEEDLE.format(key=KEY)) == 1
        assert prompt.text.endswith(pk.USER_QUESTION + "<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    # off: the same text as before the option existed
    assert pk.build_prompt(tokenizer, 1000, 0.5, KEY).text.endswith(pk.QUESTION)


def test_grid_keys_extend_the_sweep_keys():
    depths = [0.0, 0.5, 1.0]
    keys = pk.grid_keys(0, 4096, depths, 3)
    assert keys[0] == pk.trial_keys(0, 4096, depths)
    flat = [k for row in keys for k in row]
    assert len(flat) == 9 and len(set(flat)) == 9


@pytest.mark.parametrize(
    "params, fragment",
    [({"depths": [1.5]}, "depth=1.5"), ({"trials": 0}, "trials=0"), ({"scoring": "judge"}, "scoring='judge'"),
     ({"max_new_tokens": 0}, "max_new_tokens=0"), ({"lengths": [1]}, "lengths")],
)
def test_bad_task_params_name_the_argument(params, fragment):
    with pytest.raises(InvalidParameterError) as info:
        pk.validate_passkey(params)
    assert fragment in str(info.value)


def test_run_passkey_on_a_tiny_model(tokenizer):
    model = tiny_lm_for(tokenizer, max_position_embeddings=512)
    params = {"depths": [0.0, 1.0], "trials": 2}
    gen = pk.run_passkey(model, tokenizer, None, 256, params, seed=5)
    tf = pk.run_passkey(model, tokenizer, None, 256, {**params, "scoring": "teacher-forcing"}, seed=5)
    for result in (gen, tf):
        assert result["trials"] == 4 and result["correct"] == sum(t["correct"] for t in result["details"])
        assert result["accuracy"] == result["correct"] / 4
        assert [t["depth"] for t in result["details"]] == [0.0, 0.0, 1.0, 1.0]
    keys = pk.grid_keys(5, 256, [0.0, 1.0], 2)
    assert [t["key"] for t in gen["details"]] == [keys[0][0], keys[1][0], keys[0][1], keys[1][1]]
    for t in tf["details"]:
        assert t["correct"] == (t["token_hits"] == t["answer_tokens"])
    for g, t in zip(gen["details"], tf["details"]):
        assert g["key"] == t["key"]
        assert not t["correct"] or g["correct"]


def test_teacher_forcing_passes_when_the_key_is_the_models_own_greedy_output(tokenizer):
    """Build the key from what the tiny model writes after the prompt: teacher forcing must pass."""
    model = tiny_lm_for(tokenizer, max_position_embeddings=512)
    prompt = pk.build_prompt(tokenizer, 256, 0.5, KEY)
    out = pk.run_trial(model, tokenizer, prompt, max_new_tokens=3)
    greedy = tokenizer(out["continuation"], add_special_tokens=False).input_ids[:3]
    hits = pk.argmax_hits(model, prompt.input_ids, greedy)
    assert all(hits)
    own = pk.PasskeyPrompt(prompt.text, prompt.input_ids, tokenizer.decode(greedy).lstrip(), 0.5)
    if tokenizer(" " + own.key, add_special_tokens=False).input_ids == greedy:
        assert pk.run_trial_teacher_forced(model, tokenizer, own)["correct"]


GRID = {1024: 1.0, 2048: 0.9, 4096: 0.5, 8192: 0.85, 16384: 0.1}


def test_reliable_length_on_a_hand_made_grid():
    r = summaries.reliable_length(GRID)
    assert r["length"] == 8192 and r["threshold"] == 0.8
    assert r["mean_accuracy"] == pytest.approx((1.0 + 0.9 + 0.5 + 0.85) / 4)
    assert summaries.reliable_length(GRID, threshold=0.95) == {"length": 1024, "mean_accuracy": 1.0,
                                                                "threshold": 0.95}
    assert summaries.reliable_length({1024: 0.5})["length"] is None
    assert summaries.reliable_length({})["length"] is None


def test_effective_length_on_a_hand_made_grid():
    assert summaries.effective_length(GRID)["length"] == 8192  # 16384 drops under 20%
    assert summaries.effective_length(GRID, threshold=0.6)["length"] == 2048  # 4096 fails, 8192 does not count
    assert summaries.effective_length({1024: 0.1, 2048: 1.0})["length"] is None
    assert summaries.effective_length({2048: 1.0, 1024: 0.2})["length"] == 2048  # unordered input
    with pytest.raises(InvalidParameterError, match="threshold=1.5"):
        summaries.effective_length(GRID, threshold=1.5)


def test_accuracy_by_length_pools_trials_not_cells():
    records = [
        {"length": 1024, "details": [{"score": 1.0}, {"score": 0.0}, {"score": 1.0}]},
        {"length": 1024, "details": [{"score": 0.0}]},
        {"length": 512, "details": [{"score": 1.0}]},
    ]
    assert summaries.accuracy_by_length(records) == {512: 1.0, 1024: 0.5}
