"""Perplexity protocols (disjoint, sliding, truncate) and document selection.

Which tokens each protocol scores is checked three ways: on the window plan
itself (stream indices, context, counts), against the per-token NLL of one
full forward of the whole stream through a real Llama whose prediction
depends only on the previous token (so windowing cannot change a token's
NLL, only whether it is counted), and on a Llama with hand-set weights that
predicts the text perfectly (perplexity exactly 1).
"""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from evalkit import reference_nll
from tiny import make_config, make_model

from rope_ntk import data
from rope_ntk.errors import CorpusError, InvalidParameterError
from rope_ntk.evaluation import perplexity as pp
from rope_ntk.evaluation.results import ResultsStore
from rope_ntk.evaluation.sweep import SweepConfig, _cell

V = 16  # vocabulary (and hidden size) of the hand-set models
BOS = 0


class WordTokenizer:
    """Text of space-separated integers -> those ids (other words -> 1); blank lines add nothing."""

    def __init__(self, adds_bos: bool = False):
        self.bos_token_id = BOS
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [int(w) if w.isdigit() else 1 for w in text.split()]
        return SimpleNamespace(input_ids=[BOS, *ids] if add_special_tokens and self.adds_bos else ids)


def _text(ids) -> str:
    return " ".join(map(str, ids))


def _scored_stream_indices(windows: list[pp.Window], bos: bool) -> list[int]:
    """Stream index of every scored position: window position p holds stream
    token start + p - (1 if BOS else 0)."""
    return [w.start + p - bos for w in windows for p in range(w.first, len(w.ids))]


# ---------------------------------------------------------------- window plans


@pytest.mark.parametrize("bos", [None, 7])
@pytest.mark.parametrize(
    "length, stride, scored", [(4, 2, 7), (4, 2, 6), (8, 3, 7), (8, 3, 20), (9, 1, 12), (16, 5, 60), (5, 4, 4)]
)
def test_sliding_scores_each_token_once_with_at_least_length_minus_stride_context(length, stride, scored, bos):
    stream = list(range(1000, 1100))
    chosen = pp.stream_windows(stream, length, stride, scored, bos)
    has_bos = bos is not None
    first_text = 0 if has_bos else 1
    assert _scored_stream_indices(chosen, has_bos) == list(range(first_text, first_text + scored))
    assert len(chosen) == 1 + math.ceil((scored - (length - 1)) / stride)
    for k, w in enumerate(chosen):
        assert len(w.ids) == length
        text = w.ids[1:] if has_bos else w.ids
        assert (w.ids[0] == bos) if has_bos else True
        assert text == stream[w.start : w.start + len(text)]
        if k == 0:
            assert w.first == 1
        else:
            assert w.first >= length - stride  # context: at least L - S positions before each scored one
            if k < len(chosen) - 1:
                assert w.scored == stride
    assert bos not in [w.ids[p] for w in chosen for p in range(w.first, length)]


def test_sliding_worked_example_of_the_docstring():
    t = list(range(100, 110))
    # L = 4, S = 2, never: [t0 t1 t2 t3] [t2 t3 t4 t5] [t4 t5 t6 t7], scored t1 t2 t3 | t4 t5 | t6 t7
    chosen = pp.stream_windows(t, 4, 2, 7, None)
    assert [w.ids for w in chosen] == [t[0:4], t[2:6], t[4:8]]
    assert [w.ids[w.first :] for w in chosen] == [t[1:4], t[4:6], t[6:8]]
    # the last window moves back instead of running past the scored span: 6 tokens
    chosen = pp.stream_windows(t, 4, 2, 6, None)
    assert [w.ids for w in chosen] == [t[0:4], t[2:6], t[3:7]]
    assert [w.ids[w.first :] for w in chosen] == [t[1:4], t[4:6], t[6:7]]


@pytest.mark.parametrize("bos", [None, 3])
@pytest.mark.parametrize("length, count", [(2, 5), (4, 2), (17, 3)])
def test_sliding_with_stride_length_minus_one_is_disjoint(length, count, bos):
    stream = list(range(500, 600))
    span = length - 1
    chosen = pp.stream_windows(stream, length, span, count * span, bos)
    if bos is None:  # written out independently: t[k(L-1) : k(L-1)+L], positions 1.. scored
        expected = [stream[k * span : k * span + length] for k in range(count)]
    else:
        expected = [[bos, *stream[k * span : (k + 1) * span]] for k in range(count)]
    assert [w.ids for w in chosen] == expected == pp.windows(stream, length, count, bos)
    assert all(w.first == 1 for w in chosen)


def _docs_of(lengths: list[int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_text(rng.randrange(1, V) for _ in range(n)) for n in lengths]


@pytest.mark.parametrize("bos", [False, True])
def test_truncate_takes_each_long_enough_document_once(bos):
    docs = _docs_of([30, 5, 12, 11, 40, 3])
    length = 12
    text = length - bos
    params = pp.validate_perplexity({"protocol": "truncate", "tokens": None})
    chosen, selection, stride = pp.plan_windows(
        WordTokenizer(), docs, length, params, seed=0, bos_id=BOS if bos else None
    )
    long_enough = [i for i, d in enumerate(docs) if len(d.split()) >= text]
    assert list(selection.indices) == long_enough == ([0, 2, 4] if not bos else [0, 2, 3, 4])
    assert stride is None
    for w, i in zip(chosen, long_enough, strict=True):
        ids = [int(x) for x in docs[i].split()][:text]
        assert w.ids == ([BOS, *ids] if bos else ids)
        assert w.first == 1 and w.scored == length - 1


def test_truncate_worked_example_of_the_docstring():
    a, b, c = list(range(1, 11)), [1, 2, 3], [5, 6, 7, 8, 9, 10]
    params = pp.validate_perplexity({"protocol": "truncate", "tokens": None})
    chosen, selection, _ = pp.plan_windows(WordTokenizer(), [_text(a), _text(b), _text(c)], 4, params,
                                           seed=0, bos_id=None)
    assert [w.ids for w in chosen] == [a[:4], c[:4]]
    assert [w.ids[w.first :] for w in chosen] == [a[1:4], c[1:4]]
    assert selection.indices == (0, 2)


def test_truncate_budget_takes_the_first_documents_or_num_documents():
    docs = _docs_of([20] * 9)
    tok = WordTokenizer()
    params = pp.validate_perplexity({"protocol": "truncate", "tokens": 3 * 15})  # windows_for(16, 45) = 3
    chosen, selection, _ = pp.plan_windows(tok, docs, 16, params, seed=0, bos_id=None)
    assert selection.indices == (0, 1, 2) and len(chosen) == 3
    params = pp.validate_perplexity({"protocol": "truncate", "num_documents": 4})
    _, selection, _ = pp.plan_windows(tok, docs, 16, params, seed=0, bos_id=None)
    assert len(selection.indices) == 4
    assert selection == data.select_documents(docs, num_documents=4, seed=0)


# ---------------------------------------------------------------- hand-set real Llamas


def _hand_set_llama(lm_head: torch.Tensor):
    """A real LlamaForCausalLM whose logits at position i depend only on
    t[i]: one-hot embeddings, attention and MLP outputs zeroed, so the final
    RMSNorm sees sqrt(V) * onehot(t[i]) and the logits are sqrt(V) * lm_head[:, t[i]]."""
    config = make_config("llama", hidden_size=V, intermediate_size=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, bos_token_id=BOS, eos_token_id=1)
    model = make_model(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(lm_head)
    return model


CYCLE = [BOS, *random.Random(5).sample(range(1, V), V - 1)]  # BOS, then every other token once


def _successor(token: int) -> int:
    """BOS -> CYCLE[1] -> ... -> CYCLE[-1] -> CYCLE[1]: a cycle of V - 1 over the text tokens."""
    at = CYCLE.index(token)
    return CYCLE[at + 1] if at + 1 < len(CYCLE) else CYCLE[1]


@pytest.fixture(scope="module")
def perfect():
    head = torch.zeros(V, V)
    for t in range(V):
        head[_successor(t), t] = 100.0  # logit 100 * sqrt(V) on the successor, 0 elsewhere
    return _hand_set_llama(head)


def _cycle_text(n: int) -> list[int]:
    """n text tokens following the cycle from its first text token."""
    out = [CYCLE[1]]
    while len(out) < n:
        out.append(_successor(out[-1]))
    return out


PERIOD = V - 1  # with BOS, windows must start on the cycle's first token: L - 1, S multiples of it


@pytest.mark.parametrize("bos", ["never", "always"])
@pytest.mark.parametrize(
    "protocol, extra",
    [("disjoint", {}), ("sliding", {"stride": PERIOD}), ("sliding", {"stride": 2 * PERIOD}), ("truncate", {})],
)
def test_a_perfect_predictor_has_perplexity_one(perfect, protocol, extra, bos):
    length = 2 * PERIOD + 1
    docs = [_text(_cycle_text(PERIOD * k)) for k in (3, 5, 4)]  # each a whole number of cycles
    params = {"protocol": protocol, "tokens": None, "bos": bos, "chunk_size": 7, **extra}
    metrics = pp.run_perplexity(perfect, WordTokenizer(), docs, length, params, seed=0)
    assert metrics["nll_sum"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(1.0, abs=1e-6)
    total = PERIOD * 12 - (bos == "never")  # every text token but the very first without BOS
    expected_tokens = {"truncate": 3 * (length - 1)}.get(protocol, total)
    assert metrics["tokens"] == expected_tokens


def test_a_wrong_successor_costs_what_the_softmax_says(perfect):
    """One broken transition costs log(e^m + V - 1) nats with m = 100 / rms of a
    one-hot vector (about 400): counted once by every stream protocol."""
    chain = _cycle_text(60)
    chain[37] = _successor(chain[37])  # t37 is not t36's successor ...
    for i in range(38, 60):
        chain[i] = _successor(chain[i - 1])  # ... and every later token follows the rule again
    margin = 100.0 / math.sqrt(1 / V + perfect.config.rms_norm_eps)
    cost = margin + math.log1p((V - 1) * math.exp(-margin))
    for protocol, extra in (("disjoint", {}), ("sliding", {"stride": 3}), ("sliding", {"stride": 1})):
        params = {"protocol": protocol, "tokens": None, "bos": "never", **extra}
        metrics = pp.run_perplexity(perfect, WordTokenizer(), [_text(chain)], 10, params, seed=0)
        assert metrics["tokens"] == 59
        assert metrics["nll_sum"] == pytest.approx(cost, rel=1e-6), protocol


@pytest.fixture(scope="module")
def context_free():
    """Random logits that depend on the previous token only."""
    head = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    return _hand_set_llama(head)


@torch.no_grad()
def _per_token_nll(model, ids: list[int]) -> list[float]:
    """NLL of ids[j] given ids[:j], j >= 1, from one full forward, by a naive loop."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    out = []
    for j in range(1, len(ids)):
        row = logits[j - 1]
        out.append(float(torch.logsumexp(row, 0) - row[ids[j]]))
    return out


@pytest.mark.parametrize("bos", ["never", "always"])
@pytest.mark.parametrize(
    "protocol, extra", [("disjoint", {}), ("sliding", {"stride": 4}), ("sliding", {"stride": 1}), ("truncate", {})]
)
def test_scored_tokens_match_a_full_forward_of_the_whole_text(context_free, protocol, extra, bos):
    rng = random.Random(11)
    doc_ids = [[rng.randrange(1, V) for _ in range(n)] for n in (25, 9, 31)]
    docs = [_text(d) for d in doc_ids]
    length = 10
    params = {"protocol": protocol, "tokens": None, "bos": bos, "chunk_size": 3, **extra}
    metrics = pp.run_perplexity(context_free, WordTokenizer(), docs, length, params, seed=0)

    lead = [BOS] if bos == "always" else []
    if protocol == "truncate":  # each long-enough document's first L tokens, alone
        text = length - len(lead)
        nll = [x for d in doc_ids if len(d) >= text for x in _per_token_nll(context_free, lead + d[:text])]
    else:  # every text token of the stream (the first one too, after BOS) ...
        stream = [t for d in doc_ids for t in d]
        nll = _per_token_nll(context_free, lead + stream)
        if lead:  # ... but a token at a window's position 1 follows BOS, not its predecessor:
            # sliding: only t0; disjoint: t0, t9, ..., t54 (7 full windows of 9 text tokens;
            # the last window, moved back to end on t64, scores t63 t64 at positions 8, 9)
            after_bos = [0] if protocol == "sliding" else range(0, 63, length - 1)
            for j in after_bos:
                nll[j] = _per_token_nll(context_free, [BOS, stream[j]])[0]
    assert metrics["tokens"] == len(nll)
    assert metrics["nll_sum"] == pytest.approx(sum(nll), rel=1e-6)  # float32 loss vs float64
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_window_nll_equals_a_full_forward_of_each_window(llama, stride):
    """With attention: each window's scored positions, against logits of one
    forward of that window summed by a naive loop."""
    stream = torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    chosen = pp.stream_windows(stream, 24, stride, 70, None)
    expected = sum(sum(_per_token_nll(llama, w.ids)[w.first - 1 :]) for w in chosen)
    result = pp.score_windows(llama, chosen, 24, chunk_size=5)
    assert result.tokens == 70
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)
    if stride < 23:  # more context than disjoint windows give: another number
        disjoint = pp.score_windows(llama, pp.stream_windows(stream, 24, 23, 69, None), 24)
        assert result.nll_sum != pytest.approx(disjoint.nll_sum, rel=1e-4)
    # the full-window reference agrees with evalkit's
    w = chosen[0]
    assert sum(_per_token_nll(llama, w.ids)) == pytest.approx(reference_nll(llama, w.ids), rel=1e-9)


# ---------------------------------------------------------------- run_perplexity records


def test_run_perplexity_counts_and_records(context_free):
    docs = _docs_of([50, 8, 70, 40, 65])
    tok = WordTokenizer()
    length = 16
    base = {"tokens": None, "min_doc_tokens": 30}
    d = pp.run_perplexity(context_free, tok, docs, length, {**base, "protocol": "disjoint"}, seed=0)
    s = pp.run_perplexity(context_free, tok, docs, length, {**base, "protocol": "sliding"}, seed=0)
    t = pp.run_perplexity(context_free, tok, docs, length, {**base, "protocol": "truncate"}, seed=0)
    stream = 50 + 70 + 40 + 65
    assert (d["tokens"], d["windows"], d["stride"]) == (stream - 1, math.ceil((stream - 1) / 15), 15)
    assert (s["tokens"], s["windows"], s["stride"]) == (stream - 1, 1 + math.ceil((stream - 16) / 8), 8)
    assert (t["tokens"], t["windows"], t["stride"]) == (4 * 15, 4, None)
    selection = data.select_documents(docs, min_tokens=30, count_tokens=lambda x: len(x.split()))
    for m in (d, s, t):
        assert m["documents"] == [0, 2, 3, 4] == list(selection.indices)
        assert m["document_ids"] == [data.document_id(docs[i]) for i in (0, 2, 3, 4)]
        assert m["selection_sha256"] == selection.sha256
        assert m["bos"] == "never" and m["seed"] == 0
        json.dumps(m)  # a results record
    assert d["protocol"] == "disjoint" and s["protocol"] == "sliding" and t["protocol"] == "truncate"


def test_token_budget_scores_the_same_span_with_disjoint_and_sliding(context_free):
    docs = _docs_of([200])
    tok = WordTokenizer()
    d = pp.run_perplexity(context_free, tok, docs, 16, {"tokens": 50}, seed=0)  # 3 windows of 15
    s = pp.run_perplexity(context_free, tok, docs, 16, {"tokens": 50, "protocol": "sliding", "stride": 4}, seed=0)
    assert d["tokens"] == s["tokens"] == 45
    assert d["nll_sum"] == pytest.approx(s["nll_sum"], rel=1e-6)  # context-free: same tokens, same NLL
    n = pp.run_perplexity(context_free, tok, docs, 16, {"num_windows": 3, "protocol": "sliding", "stride": 4}, seed=0)
    assert (n["windows"], n["tokens"]) == (3, 15 + 2 * 4)


@pytest.mark.parametrize("adds_bos, expected", [(True, "always"), (False, "never")])
def test_auto_bos_follows_the_tokenizer_in_every_protocol(context_free, adds_bos, expected):
    docs = _docs_of([40] * 4)
    for protocol in pp.PROTOCOLS:
        params = {"protocol": protocol, "tokens": 60}
        m = pp.run_perplexity(context_free, WordTokenizer(adds_bos), docs, 16, params, seed=0)
        assert m["bos"] == expected
        expected_counts = {"disjoint": (4, 60), "sliding": (1 + math.ceil(45 / 8), 60), "truncate": (4, 60)}
        assert (m["windows"], m["tokens"]) == expected_counts[protocol]


def test_progress_total_and_updates(context_free):
    bar = SimpleNamespace(total=None, n=0)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)
    m = pp.run_perplexity(context_free, WordTokenizer(), _docs_of([100]), 16, {"protocol": "sliding", "tokens": None},
                          seed=0, progress=bar)
    assert bar.total == bar.n == m["windows"]


# ---------------------------------------------------------------- document selection


def _count(text: str) -> int:
    return len(text.split())


def test_selection_is_deterministic_and_independent_of_corpus_order():
    docs = _docs_of([5 + 3 * i for i in range(30)], seed=2)
    first = data.select_documents(docs, num_documents=6, min_tokens=20, seed=3, count_tokens=_count)
    again = data.select_documents(list(docs), num_documents=6, min_tokens=20, seed=3, count_tokens=_count)
    assert first == again
    assert list(first.indices) == sorted(first.indices)  # used in corpus order
    assert all(_count(docs[i]) >= 20 for i in first.indices)
    assert first.sha256 == data.selection_hash(docs[i] for i in first.indices)

    order = list(range(len(docs)))
    random.Random(9).shuffle(order)
    shuffled = [docs[i] for i in order]
    other = data.select_documents(shuffled, num_documents=6, min_tokens=20, seed=3, count_tokens=_count)
    assert set(other.ids) == set(first.ids)

    more = data.select_documents(docs, num_documents=7, min_tokens=20, seed=3, count_tokens=_count)
    assert set(first.indices) < set(more.indices)  # one more document adds one, removes none
    picks = {data.select_documents(docs, num_documents=6, seed=s).indices for s in range(5)}
    assert len(picks) > 1  # the seed matters


def test_selection_without_a_count_is_every_eligible_document_in_order():
    docs = _docs_of([10, 40, 25, 60, 5])
    chosen = data.select_documents(docs, min_tokens=25, count_tokens=_count)
    assert chosen.indices == (1, 2, 3)
    assert chosen.ids == tuple(data.document_id(docs[i]) for i in (1, 2, 3))
    assert data.select_documents(docs).indices == (0, 1, 2, 3, 4)


def test_exclude_by_index_and_by_id_and_the_held_out_split():
    docs = _docs_of([10 + i for i in range(20)])
    train, held = data.split_documents(docs, 0.25, seed=1)
    assert len(held.indices) == 5 and len(train.indices) == 15
    assert set(train.indices).isdisjoint(held.indices)
    assert set(train.indices) | set(held.indices) == set(range(20))
    assert data.split_documents(docs, 0.25, seed=1) == (train, held)
    assert data.split_documents(docs, 5, seed=1) == (train, held)
    assert data.select_documents(docs, exclude=train.ids) == held
    assert data.select_documents(docs, exclude=list(train.indices)) == held
    rest = data.select_documents(docs, exclude=train.ids, num_documents=3, seed=4)
    assert set(rest.indices) <= set(held.indices)
    # a held-out run through the task: only held-out documents are read
    m = pp.run_perplexity(_hand_set_llama(torch.zeros(V, V)), WordTokenizer(), docs, 8,
                          {"tokens": None, "exclude": list(train.ids)}, seed=0)
    assert m["documents"] == list(held.indices)
    assert m["perplexity"] == pytest.approx(V, rel=1e-6)  # zero logits: uniform


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(exclude=[99]), "exclude=99"),
        (dict(exclude=["0123456789abcdef"]), "0123456789abcdef"),
        (dict(exclude=[1.5]), "exclude=1.5"),
        (dict(num_documents=4, min_tokens=30, count_tokens=_count), "num_documents=4"),
        (dict(min_tokens=5), "min_tokens"),
    ],
)
def test_selection_errors_name_the_argument(kwargs, fragment):
    docs = _docs_of([10, 20, 30, 40])
    with pytest.raises((InvalidParameterError, CorpusError)) as info:
        data.select_documents(docs, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("held_out", [0.0, 1.0, 0, 20, -1, "half", True])
def test_split_needs_two_non_empty_parts(held_out):
    with pytest.raises(InvalidParameterError) as info:
        data.split_documents(_docs_of([5] * 20), held_out)
    assert f"held_out={held_out!r}" in str(info.value)


def test_selection_on_every_kind_of_corpus(tmp_path):
    docs = _docs_of([10, 40, 25, 60])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    (tmp_path / "c.txt").write_text(docs[1], encoding="utf-8")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "test.jsonl").write_text((tmp_path / "c.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    expected = data.select_documents(docs, num_documents=2, min_tokens=20, seed=0, count_tokens=_count)
    for source in ("c.jsonl", "c.json", "dataset"):  # the folder goes through datasets.load_dataset
        loaded = data.load_corpus(str(tmp_path / source))
        assert loaded == docs, source
        got = data.select_documents(loaded, num_documents=2, min_tokens=20, seed=0, count_tokens=_count)
        assert got == expected, source
    single = data.load_corpus(str(tmp_path / "c.txt"))
    assert data.select_documents(single).ids == (data.document_id(docs[1]),)


def test_bundled_essays_are_the_bundled_text_cut_at_each_date():
    whole = data.load_corpus("bundled")
    essays = data.load_corpus("bundled-essays")
    assert len(whole) == 1 and len(essays) > 150
    squeeze = str.maketrans("", "", " \n\t\r")
    assert "".join(essays).translate(squeeze) == whole[0].translate(squeeze)  # nothing lost or added
    month = r"(January|February|March|April|May|June|July|August|September|October|November|December) (19|20)\d\d"
    import re

    assert all(re.match(month, e) for e in essays)
    assert len(set(map(data.document_id, essays))) == len(essays)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "params, fragments",
    [
        ({"protocol": "strided"}, ["protocol='strided'", "disjoint", "sliding", "truncate"]),
        ({"protocol": "sliding", "stride": 0}, ["stride=0"]),
        ({"protocol": "sliding", "stride": -3}, ["stride=-3"]),
        ({"protocol": "sliding", "stride": 2.5}, ["stride=2.5"]),
        ({"protocol": "disjoint", "stride": 4}, ["stride=4", "sliding"]),
        ({"protocol": "truncate", "num_windows": 2}, ["num_windows", "truncate"]),
        ({"tokens": 0}, ["tokens=0"]),
        ({"num_windows": 0}, ["num_windows=0"]),
        ({"num_documents": 0}, ["num_documents=0"]),
        ({"min_doc_tokens": -1}, ["min_doc_tokens=-1"]),
        ({"chunk_size": 0}, ["chunk_size=0"]),
        ({"bos": "sometimes"}, ["bos='sometimes'"]),
        ({"exclude": "abc"}, ["exclude='abc'"]),
        ({"strides": 4}, ["strides", "stride"]),
        ({"protocol": "x", "tokens": -1}, ["protocol='x'", "tokens=-1"]),  # all problems at once
    ],
)
def test_bad_parameters_are_named(params, fragments):
    with pytest.raises(InvalidParameterError) as info:
        pp.validate_perplexity(params)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("stride", [16, 17, 1000])
def test_stride_must_be_below_the_length(context_free, stride):
    params = {"protocol": "sliding", "stride": stride}
    with pytest.raises(InvalidParameterError) as info:
        pp.run_perplexity(context_free, WordTokenizer(), _docs_of([500]), 16, params, seed=0)
    assert f"stride={stride}" in str(info.value) and "length=16" in str(info.value)


def test_too_little_text_is_a_corpus_error(context_free):
    tok = WordTokenizer()
    with pytest.raises(CorpusError, match="length=64"):
        pp.run_perplexity(context_free, tok, _docs_of([30, 20]), 64, {"tokens": None}, seed=0)
    with pytest.raises(CorpusError, match="truncate"):
        pp.run_perplexity(context_free, tok, _docs_of([30, 20]), 64, {"protocol": "truncate"}, seed=0)


# ---------------------------------------------------------------- sweep cells


def test_the_default_sweep_still_matches_the_committed_results():
    """Adding protocols must not orphan the committed default records."""
    from pathlib import Path

    store = ResultsStore(Path(__file__).resolve().parent.parent / "docs/results/default/results.json")
    config = SweepConfig()
    for method in config.methods:
        for length in config.lengths:
            assert store.has(_cell(config, method, length, "perplexity")), (method, length)


def test_protocol_and_selection_are_part_of_the_cell():
    base = _cell(SweepConfig(), "none", 4096, "perplexity")
    sliding = _cell(SweepConfig(protocol="sliding"), "none", 4096, "perplexity")
    assert base["protocol"] == "disjoint" and "stride" not in base
    assert (sliding["protocol"], sliding["stride"]) == ("sliding", 2048)
    assert _cell(SweepConfig(protocol="sliding", stride=2048), "none", 4096, "perplexity") == sliding
    assert _cell(SweepConfig(protocol="sliding", stride=1024), "none", 4096, "perplexity") != sliding
    picked = _cell(SweepConfig(num_documents=3, min_doc_tokens=100), "none", 4096, "perplexity")
    assert (picked["num_documents"], picked["min_doc_tokens"]) == (3, 100)
    held = _cell(SweepConfig(exclude_documents=(1, "ab")), "none", 4096, "perplexity")
    assert held["exclude_documents"] == [1, "ab"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [(dict(protocol="strided"), "protocol='strided'"), (dict(protocol="sliding", stride=4096), "stride=4096"),
     (dict(stride=8), "stride=8"), (dict(num_documents=0), "num_documents=0")],
)
def test_sweep_config_validates_the_protocol(overrides, fragment):
    with pytest.raises(InvalidParameterError) as info:
        SweepConfig(metrics=("perplexity",), **overrides).validate()
    assert fragment in str(info.value)


def test_cli_perplexity_flags(capsys, monkeypatch):
    from rope_ntk.cli import build_parser, config_from_args, main

    parser = build_parser("test", ("perplexity",))
    args = parser.parse_args(["--protocol", "sliding", "--stride", "512", "--num-documents", "3",
                              "--min-doc-tokens", "100", "--exclude-documents", "4,abcdef0123456789", "--seed", "7"])
    config = config_from_args(args)
    assert (config.protocol, config.stride, config.num_documents, config.min_doc_tokens, config.seed) == (
        "sliding", 512, 3, 100, 7)
    assert config.exclude_documents == (4, "abcdef0123456789")
    assert config_from_args(parser.parse_args(["--ppl-tokens", "all"])).ppl_tokens is None
    assert _cell(config_from_args(parser.parse_args(["--ppl-tokens", "all"])), "none", 64, "perplexity")[
        "ppl_tokens"] is None
    assert "--protocol" not in build_parser("test", ("passkey",)).format_help()

    import rope_ntk.evaluation.sweep as sweep

    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for bad, fragment in ((["--stride", "0", "--protocol", "sliding"], "stride=0"),
                          (["--protocol", "strided"], "strided"),
                          (["--ppl-tokens", "many"], "--ppl-tokens"),
                          (["--protocol", "sliding", "--stride", "9000", "--lengths", "4096"], "stride=9000")):
        try:
            status = main("test", ("perplexity",), bad)
        except SystemExit as exc:
            status = exc.code
        err = capsys.readouterr().err
        assert status == 2 and fragment in err and "Traceback" not in err


def test_sweep_records_the_protocol_and_does_not_reuse_another(tmp_path):
    from evalkit import save_tiny_lm, write_corpus

    from rope_ntk.evaluation.sweep import run_sweep

    model_dir = save_tiny_lm(tmp_path / "tiny-lm")
    corpus = write_corpus(tmp_path / "corpus.txt")
    common = dict(model=str(model_dir), corpus=str(corpus), methods=("none",), lengths=(128,), metrics=("perplexity",),
                  ppl_tokens=254, dtype="float32")
    out = tmp_path / "out"
    (first,) = run_sweep(SweepConfig(**common, protocol="sliding", stride=32), out, plot=False).records
    assert (first["protocol"], first["stride"], first["cell"]["stride"]) == ("sliding", 32, 32)
    assert (first["tokens"], first["windows"]) == (254, 1 + math.ceil((254 - 127) / 32))
    assert first["documents"] == [0] and len(first["selection_sha256"]) == 64
    records = run_sweep(SweepConfig(**common), out, plot=False).records  # disjoint: a new cell
    assert [r["protocol"] for r in records] == ["sliding", "disjoint"]
    assert (records[1]["windows"], records[1]["tokens"]) == (2, 254)
    assert records[1]["value"] != pytest.approx(first["value"], rel=1e-6)  # more context, other number
    assert len(run_sweep(SweepConfig(**common, protocol="sliding", stride=32), out, plot=False).records) == 2
