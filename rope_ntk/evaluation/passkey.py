"""Passkey retrieval (after Mohtashami & Jaggi 2023, arXiv:2305.16300).

A prompt of at most ``length`` tokens: an instruction, repeated filler about
grass, sky and sun, one line holding a random 5-digit key at relative
``depth`` (0 = start of the filler, 1 = end), more filler, and a closing
question. The model passes when the digits of its greedy continuation equal
the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError

INSTRUCTION = (
    "A pass key is hidden somewhere in the long text below. Read all of it, find the pass key "
    "and keep it in mind: at the end you will be asked for it.\n\n"
)
FILLER = "The grass is green and the sky is blue. The sun is bright and yellow. Round and round it goes. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


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


def build_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """Largest prompt of the form above with at most ``length`` tokens."""
    depth = check_depth(depth)

    def encode(n_before: int, n_after: int) -> tuple[str, list[int]]:
        text = INSTRUCTION + FILLER * n_before + NEEDLE.format(key=key) + FILLER * n_after + QUESTION
        return text, tokenizer(text).input_ids

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
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    continuation = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
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
