"""Synthetic long-context tasks in the spirit of RULER (Hsieh et al. 2024,
arXiv:2404.06654), written here from the paper's task descriptions.

Every prompt has at most ``length`` tokens of the model's tokenizer, as many
as fit (the filler is grown by bisection), and is a pure function of
(task, seed, length, trial). Scoring is exact recall: the fraction of the
expected strings found in the answer (see ``scoring.py``); the headline
``accuracy`` is its mean over trials.

Tasks (``RULER_TASKS``):

* ``niah_single``: one "The <noun> filed under <key> is <value>." sentence at
  a random depth of the haystack; recall the value.
* ``niah_multikey``: ``num_keys`` such sentences with different keys;
  ``num_queries`` of them are asked for (1: the others are distractors).
* ``niah_multivalue``: ``num_values`` sentences with the same key; all values
  must be recalled.
* ``variable_tracking``: chains ``VAR A = 12345.``, ``VAR B = A.``, ...
  (``num_hops`` hops, ``num_chains`` chains with different values) scattered
  through noise; name every variable that ends up holding the asked value.
* ``common_words``: a numbered list where ``top_k`` words occur
  ``common_freq`` times and the others ``rare_freq`` times; name the
  ``top_k`` frequent ones. The list grows with the number of rare words.

Values are 7-digit numbers, words of the corpus, or UUIDs (``value_type``).
The needle haystack is the essays (``haystack="essay"``) or a repeated noise
line (``"noise"``).
"""

from __future__ import annotations

import functools
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidParameterError
from . import taskparams as tp
from .haystack import Haystack
from .scoring import Encoder, Prompt, fit_largest, score, summarize

NOUNS = {"number": "number", "word": "word", "uuid": "code"}
NEEDLE = "The {noun} filed under {key} is {value}."
NIAH_INSTRUCTION = (
    "The long text below hides some {noun}s, each filed under a name. "
    "Remember them: a question about them follows the text.\n\n"
)
VT_INSTRUCTION = (
    "The text below contains variable assignments of the form VAR X = value. "
    "Follow them: a question about them follows the text.\n\n"
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. Some words occur many more times than others. "
    "Read the list, then answer the question after it.\n\n"
)

_NIAH = {"haystack": "essay", "value_type": "number", **tp.COMMON_DEFAULTS, "trials": 5}
_NIAH_CHECKS = {"haystack": tp.choice("essay", "noise"), "value_type": tp.choice(*NOUNS), **tp.COMMON_CHECKS}
DEFAULTS: dict[str, dict[str, Any]] = {
    "niah_single": dict(_NIAH),
    "niah_multikey": {**_NIAH, "num_keys": 4, "num_queries": 1},
    "niah_multivalue": {**_NIAH, "num_values": 4},
    "variable_tracking": {"num_chains": 1, "num_hops": 4, **tp.COMMON_DEFAULTS, "trials": 5},
    "common_words": {"top_k": 10, "common_freq": 30, "rare_freq": 3, **tp.COMMON_DEFAULTS, "trials": 5},
}
CHECKS: dict[str, dict[str, Callable]] = {
    "niah_single": _NIAH_CHECKS,
    "niah_multikey": {**_NIAH_CHECKS, "num_keys": tp.int_at_least(1), "num_queries": tp.int_at_least(1)},
    "niah_multivalue": {**_NIAH_CHECKS, "num_values": tp.int_at_least(1)},
    "variable_tracking": {"num_chains": tp.int_at_least(1), "num_hops": tp.int_at_least(0), **tp.COMMON_CHECKS},
    "common_words": {
        "top_k": tp.int_at_least(1), "common_freq": tp.int_at_least(2), "rare_freq": tp.int_at_least(1),
        **tp.COMMON_CHECKS,
    },
}


def validate(task: str, params: dict) -> dict:
    if task not in DEFAULTS:
        raise InvalidParameterError(f"task={task!r} is not known; valid: {', '.join(DEFAULTS)}.")
    params = tp.normalize(task, params, DEFAULTS[task], CHECKS[task])
    if task == "niah_multikey" and params["num_queries"] > params["num_keys"]:
        raise InvalidParameterError(
            f"num_queries={params['num_queries']} must be <= num_keys={params['num_keys']}."
        )
    if task == "common_words" and params["rare_freq"] >= params["common_freq"]:
        raise InvalidParameterError(
            f"rare_freq={params['rare_freq']} must be < common_freq={params['common_freq']} "
            "(else the frequent words are not the most frequent)."
        )
    return params


@functools.lru_cache(maxsize=4)
def _vocabulary(text: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", text))))


def vocabulary(corpus: list[str]) -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 10 letters in the first 2 MB of the corpus, sorted."""
    return _vocabulary("\n".join(corpus)[:2_000_000])


def _distinct(rng: random.Random, draw: Callable[[], str], count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = draw()
        if value not in out:
            out.append(value)
    return out


def _value_drawer(rng: random.Random, value_type: str, words: tuple[str, ...]) -> Callable[[], str]:
    if value_type == "number":
        return lambda: str(rng.randint(1_000_000, 9_999_999))
    if value_type == "word":
        return lambda: rng.choice(words)
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _listing(items: list[str]) -> str:
    return ", ".join(items)


# ---------------------------------------------------------------- generators


@dataclass
class Context:
    """What the generators share within one run: encoder, haystack, words."""

    encode: Encoder
    haystack: Haystack
    words: tuple[str, ...]


def _fit_haystack(ctx: Context, length: int, task: str, needles, question: str, prefix: str, instruction: str,
                  expected: list[str], info: dict) -> Prompt:
    answer = " " + _listing(expected) + "."

    def build(n: int) -> Prompt:
        user = instruction + ctx.haystack.text(n, needles) + question
        text, ids = ctx.encode(user, prefix)
        return Prompt(text, ids, list(expected), answer, {**info, "units": n})

    n, prompt = fit_largest(build, length, f"the {task} prompt", start=max(1, length // 40),
                            limit=ctx.haystack.capacity())
    ctx.haystack.check_filled(n, len(prompt.input_ids), length)
    return prompt


def build_niah(task: str, ctx: Context, length: int, params: dict, rng: random.Random) -> Prompt:
    """niah_single / niah_multikey / niah_multivalue prompt of one trial."""
    noun = NOUNS[params["value_type"]]
    keys_count = params.get("num_keys", 1)
    values_count = params.get("num_values", 1)
    keys = _distinct(rng, lambda: f"{rng.choice(ctx.words)}-{rng.choice(ctx.words)}", keys_count)
    values = _distinct(rng, _value_drawer(rng, params["value_type"], ctx.words), keys_count * values_count)
    # needle i holds key i // values_count (one key, several values for multivalue)
    pairs = [(keys[i // values_count], value) for i, value in enumerate(values)]
    needles = [(rng.random(), NEEDLE.format(noun=noun, key=k, value=v)) for k, v in pairs]
    queried = keys[: params.get("num_queries", 1)]
    expected = [v for k, v in pairs if k in queried]
    if task == "niah_multivalue":
        question = f"\n\nWhat are all the {noun}s filed under {keys[0]}?"
        prefix = f" The {noun}s filed under {keys[0]} are"
    elif len(queried) > 1:
        question = f"\n\nWhat are the {noun}s filed under {_listing(queried)}?"
        prefix = f" The {noun}s filed under {_listing(queried)} are"
    else:
        question = f"\n\nWhat is the {noun} filed under {keys[0]}?"
        prefix = f" The {noun} filed under {keys[0]} is"
    info = {"keys": queried, "depths": [round(d, 4) for d, _ in needles]}
    instruction = NIAH_INSTRUCTION.format(noun=noun)
    return _fit_haystack(ctx, length, task, needles, question, prefix, instruction, expected, info)


def build_variable_tracking(ctx: Context, length: int, params: dict, rng: random.Random) -> Prompt:
    chains, hops = params["num_chains"], params["num_hops"]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = _distinct(rng, lambda: "".join(rng.choice(letters) for _ in range(5)), chains * (hops + 1))
    starts = _distinct(rng, lambda: str(rng.randint(10000, 99999)), chains)
    needles = []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        depths = sorted(rng.random() for _ in chain)
        statements = [f"VAR {chain[0]} = {starts[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
        needles += list(zip(depths, statements))
    expected = names[: hops + 1]
    question = f"\n\nWhich variables are assigned the value {starts[0]}, directly or through other variables?"
    prefix = f" The variables assigned {starts[0]} are:"
    info = {"value": starts[0]}
    return _fit_haystack(ctx, length, "variable_tracking", needles, question, prefix, VT_INSTRUCTION, expected, info)


def build_common_words(ctx: Context, length: int, params: dict, rng: random.Random, seed_text: str) -> Prompt:
    k = params["top_k"]
    pool = list(ctx.words)
    rng.shuffle(pool)
    common, rare = pool[:k], pool[k:]
    question = f"\nWhich {k} words occur most often in the list above?"
    prefix = f" The {k} most frequent words are:"
    answer = " " + _listing(common) + "."

    def build(n: int) -> Prompt:
        entries = common * params["common_freq"] + rare[:n] * params["rare_freq"]
        random.Random(f"{seed_text}:{n}").shuffle(entries)
        listing = "".join(f"{i}. {word}\n" for i, word in enumerate(entries, 1))
        text, ids = ctx.encode(CWE_INSTRUCTION + listing + question, prefix)
        return Prompt(text, ids, list(common), answer, {"rare_words": n})

    _, prompt = fit_largest(build, length, "the common_words prompt", start=max(1, length // 40), limit=len(rare))
    return prompt


def build_prompt(task: str, ctx: Context, length: int, params: dict, seed: int, trial: int) -> Prompt:
    seed_text = f"ruler:{task}:{seed}:{length}:{trial}"
    rng = random.Random(seed_text)
    if task.startswith("niah_"):
        return build_niah(task, ctx, length, params, rng)
    if task == "variable_tracking":
        return build_variable_tracking(ctx, length, params, rng)
    return build_common_words(ctx, length, params, rng, seed_text)


# ---------------------------------------------------------------- running


def context_for(task: str, tokenizer, corpus, length: int, params: dict) -> Context:
    if corpus is None:
        from ..data import load_corpus

        corpus = load_corpus("bundled")
    kind = params.get("haystack", "noise")
    return Context(Encoder(tokenizer, params["chat_template"]), Haystack(tokenizer, kind, corpus, length),
                   vocabulary(corpus))


def run(task: str, model, tokenizer, corpus, length: int, params: dict, *, seed: int, progress=None) -> dict:
    """Mean recall of ``task`` over ``trials`` prompts of ``length`` tokens."""
    params = validate(task, params)
    ctx = context_for(task, tokenizer, corpus, length, params)
    trials = []
    for t in range(params["trials"]):
        prompt = build_prompt(task, ctx, length, params, seed, t)
        answer_ids = len(tokenizer(prompt.answer, add_special_tokens=False).input_ids)
        trials.append(score(model, tokenizer, prompt, params["scoring"], tp.new_tokens(params, answer_ids)))
        if progress is not None:
            progress.update(1)
    return summarize(trials, {"task": task, "task_params": params})


@dataclass(frozen=True)
class RulerTask:
    """One task in the shape of the shared task interface."""

    name: str
    defaults: dict
    validate: Callable[[dict], dict]
    run: Callable[..., dict]


def _task(name: str) -> RulerTask:
    return RulerTask(
        name=name,
        defaults=DEFAULTS[name],
        validate=functools.partial(validate, name),
        run=functools.partial(run, name),
    )


RULER_TASKS: dict[str, RulerTask] = {name: _task(name) for name in DEFAULTS}

