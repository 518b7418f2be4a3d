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
