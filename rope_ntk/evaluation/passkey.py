"""Passkey retrieval (after Mohtashami & Jaggi 2023, arXiv:2305.16300).

A prompt of at most ``length`` tokens: an instruction, repeated filler about
grass, sky and sun, one line holding a random 5-digit key at relative
``depth`` (0 = start of the filler, 1 = end), more filler, and a closing
question. The model passes when the digits of its greedy continuation equal
the key, or, with teacher forcing, when the key's tokens are the argmax
after the question.

``run_passkey`` is the task of the shared interface: a depth grid,
``trials`` prompts per depth, at one length. ``summaries.py`` turns a
length sweep of its results into the two published summaries.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidParameterError
from . import taskparams as tp
from . import scoring
from .scoring import Encoder, argmax_hits, greedy_continuation

INSTRUCTION = (
    "A pass key is hidden somewhere in the long text below. Read all of it, find the pass key "
    "and keep it in mind: at the end you will be asked for it.\n\n"
)
FILLER = "The grass is green and the sky is blue. The sun is bright and yellow. Round and round it goes. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
USER_QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"
QUESTION = USER_QUESTION + ANSWER_PREFIX


@dataclass
class PasskeyPrompt:
    text: str
    input_ids: list[int]
    key: str
    depth: float


def check_depth(depth) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise InvalidParameterError(f"depth={depth!r} must be a number in [0, 1] (0 = start, 1 = end).")
    return float(depth)


def build_prompt(tokenizer, length: int, depth: float, key: str, chat_template: bool = False) -> PasskeyPrompt:
    """Largest prompt of the form above with at most ``length`` tokens.

    With ``chat_template`` the text up to the question is a user turn and
    the assistant's reply starts with "The pass key is".
    """
    depth = check_depth(depth)
    encoder = Encoder(tokenizer, chat_template)

    def encode(n_before: int, n_after: int) -> tuple[str, list[int]]:
        user = INSTRUCTION + FILLER * n_before + NEEDLE.format(key=key) + FILLER * n_after + USER_QUESTION
        return encoder(user, ANSWER_PREFIX)

    _, fixed = encode(0, 0)
    unit = len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    if len(fixed) + unit > length:
        raise InvalidParameterError(
            f"length={length} is too short for a passkey prompt; it needs more than {len(fixed) + int(unit)} tokens."
        )
    def fits(total: int) -> tuple[str, list[int]] | None:
        before = round(total * depth)
        text, ids = encode(before, total - before)
        return (text, ids) if len(ids) <= length else None

    # start from the estimate, shrink until it fits, then grow while it fits
    total = int((length - len(fixed)) / unit)
    while total > 0 and fits(total) is None:
        total -= 1
    while fits(total + 1) is not None:
        total += 1
    text, ids = fits(total)
    return PasskeyPrompt(text, ids, key, depth)


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def extract_answer(continuation: str) -> str:
    """First run of digits in the continuation ("" if none)."""
    match = re.search(r"\d+", continuation)
    return match.group(0) if match else ""


@torch.no_grad()
def run_trial(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 10) -> dict:
    """Greedy generation with the KV cache; one prefill plus short decoding."""
    continuation = greedy_continuation(model, tokenizer, prompt.input_ids, max_new_tokens)
    answer = extract_answer(continuation)
    return {
        "depth": prompt.depth,
        "key": prompt.key,
        "answer": answer,
        "continuation": continuation,
        "prompt_tokens": len(prompt.input_ids),
        "correct": answer == prompt.key,
    }


def trial_keys(seed: int, length: int, depths: list[float]) -> list[str]:
    """Keys for one (length, depths) cell, a pure function of the seed, so a
    re-run or a resumed run uses the same keys for every method."""
    rng = random.Random(f"passkey:{seed}:{length}")
    return [random_key(rng) for _ in depths]


@torch.no_grad()
def run_trial_teacher_forced(model, tokenizer, prompt: PasskeyPrompt) -> dict:
    """One forward over prompt + " <key>": correct iff every key token is the argmax."""
    answer = tokenizer(f" {prompt.key}", add_special_tokens=False).input_ids
    hits = argmax_hits(model, prompt.input_ids, answer)
    return {
        "depth": prompt.depth,
        "key": prompt.key,
        "answer_tokens": len(answer),
        "token_hits": sum(hits),
        "prompt_tokens": len(prompt.input_ids),
        "correct": all(hits),
    }


# ---------------------------------------------------------------- the task

PASSKEY_DEFAULTS: dict[str, Any] = {"depths": [0.0, 0.25, 0.5, 0.75, 1.0], **tp.COMMON_DEFAULTS}
_CHECKS = {"depths": tp.depth_list, **tp.COMMON_CHECKS}


def validate_passkey(params: dict) -> dict:
    return tp.normalize("passkey", params, PASSKEY_DEFAULTS, _CHECKS)


def grid_keys(seed: int, length: int, depths: list[float], trials: int) -> list[list[str]]:
    """``keys[trial][depth_index]``; trial 0 equals ``trial_keys`` (the sweep's keys)."""
    rng = random.Random(f"passkey:{seed}:{length}")
    return [[random_key(rng) for _ in depths] for _ in range(trials)]


def run_passkey(model, tokenizer, corpus, length: int, params: dict, *, seed: int, progress=None) -> dict:
    """Passkey accuracy at ``length`` over ``depths`` x ``trials`` prompts (corpus unused)."""
    params = validate_passkey(params)
    depths = params["depths"]
    keys = grid_keys(seed, length, depths, params["trials"])
    build_prompt(tokenizer, length, 0.0, "00000", params["chat_template"])  # too short: fail first
    trials = []
    for d, depth in enumerate(depths):
        for row in keys:
            prompt = build_prompt(tokenizer, length, depth, row[d], params["chat_template"])
            if params["scoring"] == "teacher-forcing":
                trial = run_trial_teacher_forced(model, tokenizer, prompt)
            else:
                trial = run_trial(model, tokenizer, prompt, params["max_new_tokens"] or 10)
                trial["continuation"] = trial["continuation"][:100]
            trial["score"] = float(trial["correct"])
            trials.append(trial)
            if progress is not None:
                progress.update(1)
    correct = sum(t["correct"] for t in trials)
    return {
        "accuracy": correct / len(trials),
        "trials": len(trials),
        "correct": correct,
        "by_depth": scoring.by_depth(trials, depths),
        "task_params": params,
        "details": trials,
    }
