"""Perplexity at a fixed context length L: three protocols, token-weighted.

Every protocol runs windows of L tokens through the model and scores some of
each window's positions; perplexity = exp(sum of NLL / number of scored
tokens), never an average of per-window perplexities. A window's position 0
is never scored (nothing precedes it), so BOS is never scored.

BOS policy (all protocols): ``never`` fills a window with L text tokens;
``always`` puts BOS at position 0 and L - 1 text tokens after it, so every
text token can be scored; ``auto`` is ``always`` if the tokenizer adds BOS
when it encodes text, else ``never``.

``disjoint`` (lm-eval's rolling log-likelihood, non-overlapping windows).
The selected documents joined by blank lines form one stream t0 t1 ...;
consecutive windows score consecutive spans of L - 1 tokens. L = 4, never:
windows [t0 t1 t2 t3] [t3 t4 t5 t6], scored t1 t2 t3 | t4 t5 t6. L = 4,
always: [BOS t0 t1 t2] [BOS t3 t4 t5], scored t0 t1 t2 | t3 t4 t5.

``sliding`` (Press et al., arXiv:2108.12409). The same stream; each window
ends ``stride`` = S tokens after the previous one and scores only those S
new tokens, so each token is scored once, and after the first window with
at least L - S tokens before it in its window. L = 4, S = 2, never: windows
[t0 t1 t2 t3] [t2 t3 t4 t5] [t4 t5 t6 t7], scored t1 t2 t3 | t4 t5 | t6 t7.
A last window that would pass the end of the scored span is moved back to
end on its last token (full length, scoring only the tokens not yet
scored). S = L - 1 is exactly ``disjoint``; S = L would leave each window's
first token without context, so 1 <= S <= L - 1.

``truncate`` (the proof-pile tables of YaRN, arXiv:2309.00071). Each
selected document alone, cut to its first L tokens (L - 1 with BOS), one
forward each; documents shorter than that are not selected. L = 4, never,
documents a0..a9, b0 b1 b2, c0..c5: windows [a0 a1 a2 a3] [c0 c1 c2 c3],
scored a1 a2 a3 | c1 c2 c3.

How much is scored: ``disjoint`` and ``sliding`` score the same span of the
stream, ``windows_for(L, tokens) * (L - 1)`` tokens (``tokens`` = None: the
whole stream of the selected documents, the last window scoring what is left),
or ``num_windows`` windows. ``truncate`` scores ``num_documents`` documents,
else ``windows_for(L, tokens)`` of them, else (``tokens`` = None) all that are
long enough. Document selection: ``rope_ntk.data.iter_selected``.

The loss never holds full-vocabulary float32 logits for a whole window:
the last hidden states are projected ``chunk_size`` positions at a time (in
the model's dtype) and cast to float32 ``LOSS_ROWS`` rows at a time for the
cross-entropy; the decoder runs without a KV cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DocumentSelection, iter_selected
from ..errors import CorpusError, InvalidParameterError

BOS_POLICIES = ("auto", "always", "never")
PROTOCOLS = ("disjoint", "sliding", "truncate")


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    length: int


@dataclass(frozen=True)
class Window:
    """The ids of one forward pass; positions ``first`` .. end are scored."""

    ids: list[int]
    first: int  # >= 1: position 0 (BOS or context) is never scored
    start: int  # stream (or document) index of the first text token in ids

    @property
    def scored(self) -> int:
        return len(self.ids) - self.first


def resolve_bos(tokenizer, policy: str) -> int | None:
    """BOS id to prepend to each window, or ``None``."""
    if policy not in BOS_POLICIES:
        raise InvalidParameterError(f"bos={policy!r} is not a BOS policy; valid: {', '.join(BOS_POLICIES)}.")
    bos = tokenizer.bos_token_id
    if policy == "never":
        return None
    if policy == "always":
        if bos is None:
            raise InvalidParameterError("bos='always' but the tokenizer has no BOS token; use bos='never'.")
        return bos
    encoded = tokenizer("a").input_ids
    return bos if bos is not None and encoded and encoded[0] == bos else None


@functools.lru_cache(maxsize=32)
def _encode(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` without special tokens. Cached: every cell of a
    sweep or suite plans its windows over the same documents, and the bundled
    corpus is one 3 MB document (~2 s to tokenize); a few entries, so memory
    stays bounded on large corpora."""
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


@functools.lru_cache(maxsize=4096)
def _count(tokenizer, text: str) -> int:
    """Token count of a document, for document selection (cached: only an int per document)."""
    return len(_encode(tokenizer, text))


def _stream(tokenizer, documents, indices, min_tokens: int | None) -> tuple[list[int], list[int]]:
    """(ids, used): the documents at ``indices`` joined by blank lines,
    stopping once ``min_tokens`` ids are reached (``None``: all of them)."""
    ids: list[int] = []
    used: list[int] = []
    for index in indices:
        ids.extend(_encode(tokenizer, ("\n\n" if ids else "") + documents[index]))
        used.append(index)
        if min_tokens is not None and len(ids) >= min_tokens:
            break
    return ids, used


def tokenize_stream(tokenizer, documents: list[str], min_tokens: int) -> list[int]:
    """Token ids of the documents joined by blank lines, stopping once
    ``min_tokens`` are reached (so huge corpora are not tokenized whole)."""
    return _stream(tokenizer, documents, range(len(documents)), min_tokens)[0]


def _check_length(length) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise InvalidParameterError(f"length={length!r} must be an integer >= 2 (tokens per window).")


def check_stride(stride, length: int) -> int:
    """``stride`` of a sliding window of ``length``; ``None`` means L // 2."""
    if stride is None:
        return max(1, length // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= length - 1:
        raise InvalidParameterError(
            f"stride={stride!r} must be an integer from 1 to length - 1 = {length - 1} for length={length} "
            "(stride = length - 1 is the disjoint protocol)."
        )
    return stride


def stream_windows(stream: list[int], length: int, stride: int, scored: int, bos_id: int | None) -> list[Window]:
    """Sliding windows of ``length`` scoring the first ``scored`` scorable
    stream tokens, each once (t1.. without BOS, t0.. with it); see the module doc."""
    _check_length(length)
    stride = check_stride(stride, length)
    text = length - (bos_id is not None)  # text tokens per window
    first_scored = 1 - (bos_id is not None)  # stream index of the first scored token
    needed = first_scored + scored  # stream tokens read
    count = 1 + math.ceil(max(0, scored - (length - 1)) / stride)
    if scored < length - 1 or len(stream) < needed:
        raise CorpusError(
            f"the corpus has {len(stream)} tokens but scoring {scored} with {count} window(s) of length={length} "
            f"needs {max(needed, text)}; use a longer corpus, more documents or fewer tokens."
        )
    last = needed - 1  # stream index of the last scored token
    out: list[Window] = []
    end, prev_end = text - 1, None  # stream index of the window's last token
    while True:
        end = min(end, last)
        start = end - text + 1
        ids = stream[start : end + 1] if bos_id is None else [bos_id, *stream[start : end + 1]]
        out.append(Window(ids, 1 if prev_end is None else length - (end - prev_end), start))
        if end == last:
            return out
        prev_end, end = end, end + stride


def windows(stream: list[int], length: int, count: int, bos_id: int | None) -> list[list[int]]:
    """The ``count`` windows of the ``disjoint`` protocol (ids only)."""
    _check_length(length)
    chosen = stream_windows(stream, length, length - 1, count * (length - 1), bos_id)
    return [w.ids for w in chosen]


def _lm_parts(model):
    """(decoder returning hidden states, output projection) of a causal LM."""
    decoder = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise InvalidParameterError(
            f"{type(model).__name__} does not expose a base model and an output embedding; "
            "chunked perplexity needs both."
        )
    return decoder, head


# rows of float32 logits per cross-entropy call: 32 x a 49k vocabulary is 6 MiB, which stays in
# cache between the cast and the softmax; one call on 1024 rows (200 MiB) ran 2-4x slower on CPU
LOSS_ROWS = 32


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, chunk_size: int = 1024, first: int = 1) -> tuple[float, int]:
    """Sum of next-token NLL over positions ``first``.. of ``input_ids`` [1, L].

    Returns ``(nll_sum, scored_tokens)``; the sum is accumulated in float64.
    """
    decoder, _ = _lm_parts(model)
    # no KV cache: nothing reuses it, and filling one copies every layer's keys and values
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [1, L, hidden]
    hidden, targets = hidden[0, first - 1 : -1], input_ids[0, first:]  # predict t[i+1] from position i
    return hidden_nll(model, hidden, targets, chunk_size).item(), targets.numel()  # one sync per window


@torch.no_grad()
def hidden_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Float64 sum of the NLL of ``targets`` [n] under the logits of last hidden states ``hidden`` [n, hidden]."""
    _, head = _lm_parts(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, targets.numel(), chunk_size):
        logits = head(hidden[start : start + chunk_size])  # [chunk, vocab], model dtype
        for row in range(0, logits.shape[0], LOSS_ROWS):
            block = logits[row : row + LOSS_ROWS].float()  # [rows, vocab]
            if scale is not None:
                block = block * scale
            if softcap:
                block = torch.tanh(block / softcap) * softcap
            wanted = targets[start + row : start + row + block.shape[0]]
            total += F.cross_entropy(block, wanted, reduction="sum").double()
    return total


def score_windows(model, chosen: list[Window], length: int, chunk_size: int = 1024, progress=None) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` over the windows."""
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    for window in chosen:
        nll, count = window_nll(model, torch.tensor([window.ids], device=device), chunk_size, window.first)
        nll_sum, tokens = nll_sum + nll, tokens + count
        if progress is not None:
            progress.update(1)
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum, tokens, len(chosen), length)


def perplexity(
    model,
    stream: list[int],
    length: int,
    num_windows: int,
    bos_id: int | None,
    chunk_size: int = 1024,
    progress=None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` over ``num_windows`` disjoint windows."""
    chosen = stream_windows(stream, length, length - 1, num_windows * (length - 1), bos_id)
    return score_windows(model, chosen, length, chunk_size, progress)


def windows_for(length: int, tokens: int) -> int:
    """Windows of ``length`` needed to score about ``tokens`` tokens (>= 1)."""
    return max(1, tokens // (length - 1))


# ---------------------------------------------------------------- the task


PERPLEXITY_DEFAULTS: dict[str, Any] = {
    "protocol": "disjoint",  # disjoint | sliding | truncate
    "stride": None,  # sliding only; None = length // 2
    "tokens": 16384,  # scored-token budget; None = all of the selected documents
    "num_windows": None,  # disjoint / sliding: exactly this many windows (overrides tokens)
    "num_documents": None,  # None = every eligible document, in corpus order
    "min_doc_tokens": 0,  # documents shorter than this are never selected
    "exclude": [],  # corpus indices or document ids never selected (held-out evaluation)
    "bos": "auto",  # auto | always | never
    "chunk_size": 1024,  # positions projected to the vocabulary at a time
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_perplexity(params: dict) -> dict:
    """``params`` merged over ``PERPLEXITY_DEFAULTS``, checked; every problem
    is named in one ``InvalidParameterError``. ``stride`` against the length
    is checked when the length is known (``check_stride``)."""
    unknown = sorted(set(params) - set(PERPLEXITY_DEFAULTS))
    problems = [f"unknown perplexity parameter(s) {unknown}; valid: {', '.join(PERPLEXITY_DEFAULTS)}"] if unknown else []
    p = {**PERPLEXITY_DEFAULTS, **{k: v for k, v in params.items() if k in PERPLEXITY_DEFAULTS}}
    if p["protocol"] not in PROTOCOLS:
        problems.append(f"protocol={p['protocol']!r} is not a perplexity protocol; valid: {', '.join(PROTOCOLS)}")
    if p["bos"] not in BOS_POLICIES:
        problems.append(f"bos={p['bos']!r} is not a BOS policy; valid: {', '.join(BOS_POLICIES)}")
    for name, low, optional in (
        ("stride", 1, True), ("tokens", 1, True), ("num_windows", 1, True), ("num_documents", 1, True),
        ("min_doc_tokens", 0, False), ("chunk_size", 1, False),
    ):
        value = p[name]
        if not (value is None and optional) and not (_is_int(value) and value >= low):
            valid = f"an integer >= {low}" + (" or None" if optional else "")
            problems.append(f"{name}={value!r} must be {valid}")
    if p["stride"] is not None and p["protocol"] != "sliding":
        problems.append(f"stride={p['stride']!r} applies only to protocol='sliding', not {p['protocol']!r}")
    if p["num_windows"] is not None and p["protocol"] == "truncate":
        problems.append("num_windows does not apply to protocol='truncate' (one window per document); "
                        "use num_documents")
    if isinstance(p["exclude"], (str, bytes)) or not isinstance(p["exclude"], (list, tuple)):
        problems.append(f"exclude={p['exclude']!r} must be a list of corpus indices or document ids")
    elif any(isinstance(e, bool) or not isinstance(e, (int, str)) for e in p["exclude"]):
        problems.append(f"exclude={p['exclude']!r} must hold only corpus indices (int) or document ids (str)")
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")
    return {**p, "exclude": list(p["exclude"])}


def plan_windows(tokenizer, corpus: list[str], length: int, params: dict, *, seed: int, bos_id: int | None):
    """(windows, selection, stride) for validated ``params``; no model needed."""
    _check_length(length)
    protocol, tokens = params["protocol"], params["tokens"]
    text = length - (bos_id is not None)
    if not corpus:
        raise CorpusError("the corpus holds no documents.")

    def count(doc: str) -> int:
        return _count(tokenizer, doc)

    minimum = params["min_doc_tokens"]
    if protocol == "truncate":
        minimum = max(minimum, text)  # a window full of one document
    selected = iter_selected(
        corpus, num_documents=params["num_documents"], min_tokens=minimum, seed=seed,
        exclude=params["exclude"], count_tokens=count,
    )

    if protocol == "truncate":
        limit = params["num_documents"] or (windows_for(length, tokens) if tokens else None)
        chosen, used = [], []
        for index in selected:  # lazy: stops measuring documents once enough are found
            ids = list(_encode(tokenizer, corpus[index])[:text])
            chosen.append(Window(ids if bos_id is None else [bos_id, *ids], 1, 0))
            used.append(index)
            if len(used) == limit:
                break
        if not used or (limit is not None and len(used) < limit):
            raise CorpusError(
                f"protocol='truncate' at length={length} needs documents of at least {minimum} tokens; "
                f"found {len(used)} of the {limit or 1} needed; use a shorter length or another corpus."
            )
        return chosen, DocumentSelection.of(corpus, used), None

    stride = length - 1 if protocol == "disjoint" else check_stride(params["stride"], length)
    if params["num_windows"] is not None:
        scored = (length - 1) + (params["num_windows"] - 1) * stride
    elif tokens is not None:
        scored = windows_for(length, tokens) * (length - 1)
    else:
        scored = None  # everything the selected documents hold
    need = None if scored is None else scored + (bos_id is None)
    stream, used = _stream(tokenizer, corpus, selected, need)
    if scored is None:
        scored = max(0, len(stream) - (bos_id is None))
    chosen = stream_windows(stream, length, stride, scored, bos_id)
    return chosen, DocumentSelection.of(corpus, used), stride


def run_perplexity(model, tokenizer, corpus, length: int, params: dict, *, seed: int, progress=None) -> dict:
    """The perplexity task: ``params`` as ``PERPLEXITY_DEFAULTS``; returns
    the metrics and what reproduces them (protocol, stride, documents...)."""
    params = validate_perplexity(params)
    bos_id = resolve_bos(tokenizer, params["bos"])
    chosen, selection, stride = plan_windows(tokenizer, corpus, length, params, seed=seed, bos_id=bos_id)
    if progress is not None:
        progress.total = len(chosen)
    result = score_windows(model, chosen, length, params["chunk_size"], progress)
    return {
        "perplexity": result.perplexity,
        "nll_sum": result.nll_sum,
        "tokens": result.tokens,
        "windows": result.windows,
        "length": length,
        "protocol": params["protocol"],
        "stride": stride,
        "bos": "never" if bos_id is None else "always",
        "min_doc_tokens": params["min_doc_tokens"],
        "num_documents": len(selection.indices),
        "seed": seed,
        **selection.record(),
    }
