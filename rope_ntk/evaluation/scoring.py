"""Prompt encoding, length fitting and the two ways of scoring an answer.

* **generation**: one greedy ``generate`` call (the prompt is prefilled
  once, then a few tokens are decoded with the KV cache); the answer is the
  decoded continuation, and each expected string counts as recalled when it
  appears in it as a whole word (case-insensitive).
* **teacher forcing**: one forward over ``prompt + gold answer`` tokens;
  an expected string counts as recalled when every token of it is an
  argmax at its position (ties count), given the prompt and the gold tokens before it.
  No decoding loop, so it is much cheaper on a CPU, and stricter: the gold
  answer is tokenized on its own, so a model that would spell the same
  digits with another token split fails it.

A prompt is a user message and an answer prefix (``" The pass key is"``).
Without a chat template the two are concatenated; with one, the user
message goes into a user turn and the prefix starts the assistant's reply.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import InvalidParameterError

SCORINGS = ("generate", "teacher-forcing")


@dataclass
class Prompt:
    """One trial: what the model reads and what it must recall."""

    text: str  # exactly what was tokenized (chat template applied if any)
    input_ids: list[int]
    expected: list[str]  # strings that must be recalled
    answer: str  # gold continuation scored by teacher forcing, e.g. " 4821, 9077"
    info: dict[str, Any] = field(default_factory=dict)  # task details kept in the record


class Encoder:
    """Turns (user message, answer prefix) into the text and ids the model reads."""

    def __init__(self, tokenizer, chat_template: bool = False):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise InvalidParameterError(
                "chat_template=True but the tokenizer has no chat template "
                "(tokenizer.chat_template is empty); run with chat_template=False."
            )
        self.tokenizer = tokenizer
        self.chat_template = bool(chat_template)

    def __call__(self, user: str, prefix: str) -> tuple[str, list[int]]:
        if not self.chat_template:
            text = user + prefix
            return text, self.tokenizer(text).input_ids
        turn = [{"role": "user", "content": user}]
        head = self.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        text = head + prefix.lstrip()
        # the template writes its own special tokens
        return text, self.tokenizer(text, add_special_tokens=False).input_ids


def fit_largest(
    build: Callable[[int], Any], length: int, what: str, start: int = 1, limit: int | None = None
) -> tuple[int, Any]:
    """Largest ``n`` in [0, limit] whose ``build(n).input_ids`` has at most ``length`` tokens.

    ``build`` must grow (weakly) with ``n``. Galloping then bisection: about
    2 log2(n) prompts are tokenized. Raises when even ``n = 0`` does not fit.
    """
    smallest = build(0)
    if len(smallest.input_ids) > length:
        raise InvalidParameterError(
            f"length={length} is too short for {what}: the shortest prompt has "
            f"{len(smallest.input_ids)} tokens; give a length above that."
        )
    lo, lo_prompt = 0, smallest  # fits
    hi = max(1, start)
    while True:
        if limit is not None and hi >= limit:
            hi = limit
            prompt = build(limit)
            if len(prompt.input_ids) <= length:
                return limit, prompt
            break
        prompt = build(hi)
        if len(prompt.input_ids) > length:
            break
        lo, lo_prompt, hi = hi, prompt, hi * 2
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        prompt = build(mid)
        if len(prompt.input_ids) <= length:
            lo, lo_prompt = mid, prompt
        else:
            hi = mid
    return lo, lo_prompt


def recalled(expected: list[str], text: str) -> list[bool]:
    """Whether each expected string occurs in ``text`` as a whole word (any case)."""
    found = []
    for item in expected:
        pattern = rf"(?<![A-Za-z0-9]){re.escape(item)}(?![A-Za-z0-9])"
        found.append(re.search(pattern, text, flags=re.IGNORECASE) is not None)
    return found


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_continuation(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding after one prefill of the prompt (KV cache)."""
    ids = torch.tensor([input_ids], device=_device(model))
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
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def argmax_hits(model, prompt_ids: list[int], answer_ids: list[int]) -> list[bool]:
    """One forward over prompt + answer: is each answer token an argmax at its position?

    A token tied with the maximum counts: in bfloat16 exact ties occur (the
    bundled model's logits near 23 are spaced 0.125 apart), and which of the
    tied tokens greedy decoding picks depends on the kernels that ran.
    """
    ids = torch.tensor([prompt_ids + answer_ids], device=_device(model))
    n = len(answer_ids)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n + 1  # only the positions that predict answer tokens (+ the last)
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    # logits: [1, kept, vocab]; position i predicts token i + 1
    scores = logits[0, -(n + 1) : -1]  # [n, vocab]
    target = torch.tensor(answer_ids, device=scores.device)
    chosen = scores.gather(1, target[:, None])[:, 0]
    return (chosen >= scores.max(dim=-1).values).tolist()


def answer_tokens(tokenizer, answer: str, expected: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``answer`` and, for each expected string, the indices of
    the tokens that overlap its first occurrence in ``answer``."""
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    spans, start = [], 0
    for item in expected:
        begin = answer.index(item, start)
        end = begin + len(item)
        spans.append([i for i, (a, b) in enumerate(encoded.offset_mapping) if a < end and b > begin])
        start = end
    return list(encoded.input_ids), spans


def score(model, tokenizer, prompt: Prompt, scoring: str, max_new_tokens: int) -> dict[str, Any]:
    """Score one prompt; returns a compact, JSON-ready trial record."""
    if scoring == "generate":
        continuation = greedy_continuation(model, tokenizer, prompt.input_ids, max_new_tokens)
        found = recalled(prompt.expected, continuation)
        detail = {"output": continuation[:300]}
    elif scoring == "teacher-forcing":
        ids, spans = answer_tokens(tokenizer, prompt.answer, prompt.expected)
        hits = argmax_hits(model, prompt.input_ids, ids)
        found = [all(hits[i] for i in span) for span in spans]
        detail = {"answer_tokens": len(ids), "token_hits": sum(hits)}
    else:
        raise InvalidParameterError(f"scoring={scoring!r} is not known; valid: {', '.join(SCORINGS)}.")
    return {
        **prompt.info,
        "prompt_tokens": len(prompt.input_ids),
        "expected": prompt.expected,
        "found": found,
        "score": sum(found) / len(found),
        **detail,
    }


def by_depth(trials: list[dict[str, Any]], depths: list[float]) -> list[dict[str, Any]]:
    """Mean score per depth, in the form the report reads (``report.depth_scores``)."""
    rows = []
    for depth in depths:
        scores = [t["score"] for t in trials if t["depth"] == depth]
        rows.append({"depth": depth, "accuracy": sum(scores) / len(scores), "trials": len(scores)})
    return rows


def summarize(trials: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Headline ``accuracy`` = mean recall over trials (1 per fully recalled
    trial, a fraction for a partly recalled multi-value answer)."""
    accuracy = sum(t["score"] for t in trials) / len(trials)
    return {
        "accuracy": accuracy,
        "trials": len(trials),
        "correct": sum(t["score"] == 1 for t in trials),
        **(extra or {}),
        "details": trials,
    }
