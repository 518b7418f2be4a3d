"""Training data: held-out split, packing, a resumable order, PoSE position ids.

Everything here is a pure function of its inputs and the seed, so a run
restarted at step k sees exactly the samples it would have seen:

* ``split_documents`` holds out whole documents (never a piece of one);
* ``pack`` joins the tokenized training documents, each followed by EOS,
  and cuts the stream into blocks of ``window`` tokens (the tail is dropped);
* ``sample_index`` maps (step, micro-batch, process, row) to a global sample
  number, and ``block_of`` maps that to a block through a seeded permutation
  per epoch; nothing is consumed, so there is no sampler state to save;
* ``pose_position_ids`` draws a sample's PoSE positions from a generator
  seeded by (seed, sample number).
"""

from __future__ import annotations

import random
import re

import torch

from ..errors import CorpusError, InvalidParameterError

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# the bundled file glues the essays together; most start with "Month YYYY" right
# before their first word ("April 2012A palliative care nurse ...")
_ESSAY_START = re.compile(rf"(?:{_MONTHS}) \d{{4}}(?=[A-Z\"'(])")


def split_essays(text: str) -> list[str]:
    """The bundled essays file cut before each dated essay header.

    The newer essays at the end of the file carry no date, so they stay
    together as one long document; the split is still document-level.
    """
    starts = [m.start() for m in _ESSAY_START.finditer(text)]
    bounds = [0, *[s for s in starts if s > 0], len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train_ids, heldout_ids)``: indices into ``docs``, whole documents.

    The documents are visited in an order shuffled by ``seed``; one joins the
    held-out set while the held-out characters stay within
    ``heldout_fraction`` of the total (so a huge document is not held out by
    a small fraction). Both lists come back sorted. Raises CorpusError when
    no document fits or nothing is left to train on.
    """
    if heldout_fraction == 0:
        return list(range(len(docs))), []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    budget = heldout_fraction * sum(len(d) for d in docs)
    heldout, used = [], 0
    for i in order:
        if used + len(docs[i]) <= budget:
            heldout.append(i)
            used += len(docs[i])
    train = sorted(set(range(len(docs))) - set(heldout))
    if not heldout or not train:
        raise CorpusError(
            f"heldout_fraction={heldout_fraction} cannot hold out whole documents of this corpus "
            f"({len(docs)} document(s), the shortest {min(len(d) for d in docs)} characters); "
            "use a corpus with more documents, another fraction, or 0 for no held-out set."
        )
    return train, sorted(heldout)


def pack(tokenizer, docs: list[str], window: int) -> torch.Tensor:
    """Blocks [n, window] of the documents' tokens, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            stream.append(eos)
    count = len(stream) // window
    if count == 0:
        raise CorpusError(
            f"the training documents hold {len(stream)} tokens, fewer than one window={window}; "
            "use a longer corpus or a shorter window."
        )
    return torch.tensor(stream[: count * window]).view(count, window)


def sample_index(step: int, micro: int, process: int, row: int, batch_size: int, grad_accum: int, processes: int) -> int:
    """Global number of a sample: steps take consecutive runs of samples.

    Within step ``step`` the samples are ordered (micro-batch, process, row),
    so one process with ``grad_accum * processes`` micro-batches reads the
    same samples, in the same order, as ``processes`` processes do.
    """
    per_step = batch_size * grad_accum * processes
    return step * per_step + (micro * processes + process) * batch_size + row


def block_of(sample: int, blocks: int, seed: int) -> int:
    """Block read by global sample ``sample``: a fresh permutation per epoch."""
    epoch, position = divmod(sample, blocks)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return int(torch.randperm(blocks, generator=generator)[position])


def pose_position_ids(window: int, target_length: int, chunks: int, generator: torch.Generator) -> torch.Tensor:
    """PoSE position ids [window] (Zhu et al. 2023, arXiv 2309.10400).

    The window is cut into ``chunks`` contiguous pieces at random points;
    piece i keeps its tokens' order but is shifted by a skip ``u_i``, with
    ``0 <= u_1 <= ... <= u_chunks <= target_length - window`` drawn as
    sorted uniform integers. So the ids are strictly increasing, lie in
    ``[0, target_length)``, and the relative distance of two tokens is their
    distance in the window plus the skips between them: over many samples
    every distance up to ``target_length - 1`` is seen while training at
    ``window`` tokens.
    """
    if chunks < 1 or chunks > window:
        raise InvalidParameterError(f"pose_chunks={chunks} must be between 1 and window={window}.")
    if target_length < window:
        raise InvalidParameterError(f"window={window} must be <= target_length={target_length} for PoSE.")
    cuts = torch.randperm(window - 1, generator=generator)[: chunks - 1] + 1 if chunks > 1 else torch.tensor([])
    bounds = [0, *sorted(int(c) for c in cuts), window]
    slack = target_length - window
    skips = sorted(int(s) for s in torch.randint(0, slack + 1, (chunks,), generator=generator))
    ids = torch.arange(window)
    for (start, stop), skip in zip(zip(bounds, bounds[1:]), skips):
        ids[start:stop] += skip
    return ids


def pose_generator(seed: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sample + 1)
