"""Needle in a haystack over real text, scored by exact recall (no judge model).

A needle sentence with a random 7-digit value, "The secret code of the
<key> vault is <value>.", goes in at a sentence boundary at relative
``depth`` of essay text cut so that the whole prompt (instruction,
haystack, question, answer prefix) has at most ``length`` tokens of the
model's tokenizer, as many as fit. The model passes when its answer holds
the value (generation) or when the value's tokens are the argmax after the
answer prefix (teacher forcing). The grid is depths x lengths, ``trials``
prompts per depth; ``heatmap`` draws it.

The format follows the needle-in-a-haystack test of G. Kamradt (2023),
with an exact-match score in place of the judge model.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from . import taskparams as tp
from .haystack import Haystack
from .scoring import Encoder, Prompt, by_depth, fit_largest, score, summarize

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Below is a long text. Somewhere in it is one sentence giving a secret code. "
    "Read the text, then answer the question after it.\n\n"
)
NEEDLE = "The secret code of the {key} vault is {value}."
QUESTION = "\n\nWhat is the secret code of the {key} vault?"
PREFIX = " The secret code of the {key} vault is"
KEYS = (
    "amber", "birch", "cobalt", "delta", "ember", "falcon", "granite", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "thistle",
)

NEEDLE_DEFAULTS: dict[str, Any] = {
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "haystack": "essay",  # or "noise"
    **tp.COMMON_DEFAULTS,
}
_CHECKS = {"depths": tp.depth_list, "haystack": tp.choice("essay", "noise"), **tp.COMMON_CHECKS}


def validate_needle(params: dict) -> dict:
    return tp.normalize("needle", params, NEEDLE_DEFAULTS, _CHECKS)


def needle_for(seed: int, length: int, depth_index: int, trial: int) -> tuple[str, str]:
    """(key, value) of one trial: a pure function of its coordinates."""
    rng = random.Random(f"needle:{seed}:{length}:{depth_index}:{trial}")
    return rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))


def build_prompt(encode: Encoder, haystack: Haystack, length: int, depth: float, key: str, value: str) -> Prompt:
    """The longest prompt of at most ``length`` tokens with the needle at ``depth``."""
    needle = NEEDLE.format(key=key, value=value)

    def build(n: int) -> Prompt:
        user = INSTRUCTION + haystack.text(n, [(depth, needle)]) + QUESTION.format(key=key)
        text, ids = encode(user, PREFIX.format(key=key))
        return Prompt(text, ids, [value], f" {value}.", {"depth": depth, "key": key, "units": n})

    n, prompt = fit_largest(build, length, "a needle prompt", start=max(1, length // 40), limit=haystack.capacity())
    haystack.check_filled(n, len(prompt.input_ids), length)
    return prompt


def run_needle(model, tokenizer, corpus, length: int, params: dict, *, seed: int, progress=None) -> dict:
    """Accuracy over ``depths`` x ``trials`` needle prompts of ``length`` tokens."""
    params = validate_needle(params)
    if corpus is None and params["haystack"] == "essay":
        from ..data import load_corpus

        corpus = load_corpus("bundled")
    encode = Encoder(tokenizer, params["chat_template"])
    haystack = Haystack(tokenizer, params["haystack"], corpus, max_tokens=length)
    trials = []
    for d, depth in enumerate(params["depths"]):
        for t in range(params["trials"]):
            key, value = needle_for(seed, length, d, t)
            prompt = build_prompt(encode, haystack, length, depth, key, value)
            answer_ids = len(tokenizer(prompt.answer, add_special_tokens=False).input_ids)
            trials.append(score(model, tokenizer, prompt, params["scoring"], tp.new_tokens(params, answer_ids)))
            if progress is not None:
                progress.update(1)
    return summarize(trials, {"by_depth": by_depth(trials, params["depths"]), "task_params": params})


def grid(records: list[dict]) -> tuple[list[float], list[int], list[list[float | None]]]:
    """(depths, lengths, accuracy[depth][length]) from task results holding per-trial ``details``
    (each with ``depth``) and ``length``; all trials of a (depth, length) pooled."""
    cells: dict[tuple[float, int], list[float]] = {}
    for record in records:
        for trial in record["details"]:
            cells.setdefault((trial["depth"], record["length"]), []).append(trial["score"])
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    table = [
        [sum(cells[(d, n)]) / len(cells[(d, n)]) if (d, n) in cells else None for n in lengths] for d in depths
    ]
    return depths, lengths, table


def heatmap(records: list[dict], path: str | Path, title: str = "Needle in a haystack") -> bool:
    """Depth x length accuracy heatmap as a PNG; False (and a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no heatmap written (pip install 'rope-ntk[plots]')")
        return False
    depths, lengths, table = grid(records)
    if not depths:
        return False
    values = [[float("nan") if v is None else v for v in row] for row in table]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True
