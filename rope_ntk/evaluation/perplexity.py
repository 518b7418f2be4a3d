"""Perplexity at a fixed context length, token-weighted, in bounded memory.

Protocol (``disjoint``). The corpus documents are joined with a blank line
into one token stream ``t[0], t[1], ...``. A window of ``L`` tokens scores
``L - 1`` consecutive tokens, and consecutive windows score consecutive
spans, so every token is scored at most once:

* BOS policy ``never``: window k is ``t[k(L-1) : k(L-1) + L]``; the first
  token is context only (it was scored by window k-1, or is ``t[0]``);
* BOS policy ``always``: window k is ``[BOS] + t[k(L-1) : (k+1)(L-1)]``;
  every text token is scored, BOS never is;
* ``auto`` follows the tokenizer: ``always`` if encoding text adds BOS.

Worked example, L = 4, never: windows [t0 t1 t2 t3], [t3 t4 t5 t6]; scored
t1 t2 t3 | t4 t5 t6; perplexity = exp((nll(t1..t3) + nll(t4..t6)) / 6).
Windows are averaged per token, never per window.

The loss never holds full-vocabulary float32 logits for a whole window:
the last hidden states are projected ``chunk_size`` positions at a time (in
the model's dtype) and cast to float32 ``LOSS_ROWS`` rows at a time for the
cross-entropy; the decoder runs without a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CorpusError, InvalidParameterError

BOS_POLICIES = ("auto", "always", "never")


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    length: int


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


def tokenize_stream(tokenizer, documents: list[str], min_tokens: int) -> list[int]:
    """Token ids of the documents joined by blank lines, stopping once
    ``min_tokens`` are reached (so huge corpora are not tokenized whole)."""
    ids: list[int] = []
    for doc in documents:
        piece = tokenizer(("\n\n" if ids else "") + doc, add_special_tokens=False).input_ids
        ids.extend(piece)
        if len(ids) >= min_tokens:
            break
    return ids


def windows(stream: list[int], length: int, count: int, bos_id: int | None) -> list[list[int]]:
    """The ``count`` windows of ``length`` tokens described in the module doc."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise InvalidParameterError(f"length={length!r} must be an integer >= 2 (tokens per window).")
    span = length - 1  # tokens scored per window
    needed = count * span + (0 if bos_id is not None else 1)
    if len(stream) < needed:
        raise CorpusError(
            f"the corpus has {len(stream)} tokens but {count} window(s) of length={length} need {needed}; "
            "use a longer corpus or fewer tokens."
        )
    if bos_id is not None:
        return [[bos_id] + stream[k * span : (k + 1) * span] for k in range(count)]
    return [stream[k * span : k * span + length] for k in range(count)]


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
def window_nll(model, input_ids: torch.Tensor, chunk_size: int = 1024) -> tuple[float, int]:
    """Sum of next-token NLL over positions 1.. of ``input_ids`` [1, L].

    Returns ``(nll_sum, scored_tokens)``; the sum is accumulated in float64.
    """
    decoder, _ = _lm_parts(model)
    # no KV cache: nothing reuses it, and filling one copies every layer's keys and values
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [1, L, hidden]
    hidden, targets = hidden[0, :-1], input_ids[0, 1:]  # predict t[i+1] from position i
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


def perplexity(
    model,
    stream: list[int],
    length: int,
    num_windows: int,
    bos_id: int | None,
    chunk_size: int = 1024,
    progress=None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` over ``num_windows`` windows."""
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    chosen = windows(stream, length, num_windows, bos_id)
    for window in chosen:
        nll, count = window_nll(model, torch.tensor([window], device=device), chunk_size)
        nll_sum, tokens = nll_sum + nll, tokens + count
        if progress is not None:
            progress.update(1)
    return PerplexityResult(math.exp(nll_sum / tokens), nll_sum, tokens, len(chosen), length)


def windows_for(length: int, tokens: int) -> int:
    """Windows of ``length`` needed to score about ``tokens`` tokens (>= 1)."""
    return max(1, tokens // (length - 1))
