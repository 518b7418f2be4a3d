"""Perplexity: the disjoint window protocol, the BOS policy, and the chunked
token-weighted loss against independent float64 computations and against
models whose perplexity is known exactly (1 for a perfect predictor, V for a
uniform one)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from evalkit import bundled_tokenizer, reference_nll
from tiny import VOCAB, make_config, make_model

from rope_ntk.errors import CorpusError, InvalidParameterError
from rope_ntk.evaluation import perplexity as pp

# ---------------------------------------------------------------- windows


def _stream(n: int) -> list[int]:
    """Distinct ids, so a scored token's position in the stream is unambiguous."""
    return list(range(1000, 1000 + n))


def _scored(windows: list[list[int]]) -> list[int]:
    """The tokens a window scores are its positions 1..L-1 (position 0 is context)."""
    return [token for window in windows for token in window[1:]]


@pytest.mark.parametrize("length, count", [(2, 5), (4, 2), (17, 3), (64, 1)])
def test_windows_without_bos_score_each_stream_token_once(length, count):
    span = length - 1
    stream = _stream(count * span + 1 + 7)  # some tokens to spare
    chosen = pp.windows(stream, length, count, None)
    assert len(chosen) == count
    assert all(len(w) == length for w in chosen)
    assert chosen[0][0] == stream[0]
    # consecutive spans: the scored tokens are exactly t1 .. t[count*span], in order, once each
    assert _scored(chosen) == stream[1 : count * span + 1]
    # window k starts with the last token of window k-1: context only, already scored
    for before, after in zip(chosen, chosen[1:]):
        assert after[0] == before[-1]


@pytest.mark.parametrize("length, count", [(2, 5), (4, 2), (17, 3), (64, 1)])
def test_windows_with_bos_score_every_text_token_and_never_bos(length, count):
    bos = 7  # not in the stream
    span = length - 1
    stream = _stream(count * span + 5)
    chosen = pp.windows(stream, length, count, bos)
    assert len(chosen) == count
    assert all(len(w) == length for w in chosen)
    assert all(w[0] == bos for w in chosen)
    scored = _scored(chosen)
    assert scored == stream[: count * span]  # t0 is scored too: BOS is its context
    assert bos not in scored


def test_windows_worked_example_of_the_docstring():
    t = _stream(10)
    # L = 4, never: windows [t0 t1 t2 t3], [t3 t4 t5 t6]
    assert pp.windows(t, 4, 2, None) == [t[0:4], t[3:7]]
    # L = 4, always: [BOS t0 t1 t2], [BOS t3 t4 t5]
    assert pp.windows(t, 4, 2, 5) == [[5, *t[0:3]], [5, *t[3:6]]]


@pytest.mark.parametrize("bos", [None, 3])
def test_windows_need_exactly_the_tokens_they_score(bos):
    length, count = 9, 3
    needed = count * (length - 1) + (0 if bos is not None else 1)
    assert len(pp.windows(_stream(needed), length, count, bos)) == count  # exactly enough
    with pytest.raises(CorpusError) as info:
        pp.windows(_stream(needed - 1), length, count, bos)
    message = str(info.value)
    assert f"length={length}" in message
    assert f"{needed - 1} tokens" in message
    assert str(needed) in message


@pytest.mark.parametrize("length", [1, 0, -4])
def test_windows_reject_lengths_below_two(length):
    with pytest.raises(InvalidParameterError) as info:
        pp.windows(_stream(100), length, 1, None)
    assert f"length={length!r}" in str(info.value)


@pytest.mark.parametrize("length", [8.0, "8", True, None])
def test_windows_reject_non_integer_lengths(length):
    with pytest.raises(InvalidParameterError) as info:
        pp.windows(_stream(100), length, 1, None)
    assert f"length={length!r}" in str(info.value)


def test_windows_for_matches_the_documented_default_split():
    # README: about 16384 scored tokens = 4 windows of 4096, 2 of 8192, 1 of 16384
    assert pp.windows_for(4096, 16384) == 4
    assert pp.windows_for(8192, 16384) == 2
    assert pp.windows_for(16384, 16384) == 1
    assert pp.windows_for(32768, 16384) == 1  # never zero windows
    for length in (64, 100, 1000, 4096):
        n = pp.windows_for(length, 5000)
        assert n * (length - 1) <= 5000 < (n + 1) * (length - 1)


# ---------------------------------------------------------------- BOS policy


class FakeTokenizer:
    """``bos_token_id`` plus ``__call__`` that adds BOS or not."""

    def __init__(self, bos_token_id, adds_bos: bool):
        self.bos_token_id = bos_token_id
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id, *ids]
        return SimpleNamespace(input_ids=ids)


@pytest.mark.parametrize(
    "bos, adds, policy, expected",
    [
        (1, True, "auto", 1),
        (0, True, "auto", 0),  # id 0 is a real BOS, not "no BOS"
        (1, False, "auto", None),
        (None, False, "auto", None),
        (1, False, "always", 1),
        (0, False, "always", 0),
        (1, True, "always", 1),
        (1, True, "never", None),
        (None, False, "never", None),
    ],
)
def test_resolve_bos(bos, adds, policy, expected):
    assert pp.resolve_bos(FakeTokenizer(bos, adds), policy) == expected


def test_resolve_bos_always_without_a_bos_token():
    with pytest.raises(InvalidParameterError) as info:
        pp.resolve_bos(FakeTokenizer(None, False), "always")
    assert "bos='always'" in str(info.value)


@pytest.mark.parametrize("policy", ["sometimes", "", "AUTO", None])
def test_resolve_bos_unknown_policy(policy):
    with pytest.raises(InvalidParameterError) as info:
        pp.resolve_bos(FakeTokenizer(1, True), policy)
    message = str(info.value)
    assert f"bos={policy!r}" in message
    assert all(p in message for p in pp.BOS_POLICIES)


def test_resolve_bos_of_the_bundled_tokenizer():
    # README: SmolLM2's tokenizer does not add BOS when encoding, so auto = never
    tokenizer = bundled_tokenizer()
    assert tokenizer.bos_token_id is not None
    assert pp.resolve_bos(tokenizer, "auto") is None
    assert pp.resolve_bos(tokenizer, "always") == tokenizer.bos_token_id


def test_tokenize_stream_joins_documents_with_a_blank_line_and_stops_early():
    tokenizer = FakeTokenizer(1, adds_bos=True)  # special tokens must not be added
    docs = ["ab", "cd", "ef"]
    assert pp.tokenize_stream(tokenizer, docs, 100) == [ord(c) for c in "ab\n\ncd\n\nef"]
    assert pp.tokenize_stream(tokenizer, docs, 2) == [ord(c) for c in "ab"]
    assert pp.tokenize_stream(tokenizer, docs, 3) == [ord(c) for c in "ab\n\ncd"]


# ---------------------------------------------------------------- loss vs an independent computation


def _random_stream(n: int, seed: int = 3) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=generator).tolist()


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("bos", [None, 0])
def test_perplexity_equals_exp_mean_cross_entropy_of_full_logits(llama, chunk_size, bos):
    length, count = 40, 3
    stream = _random_stream(200)
    chosen = pp.windows(stream, length, count, bos)
    nll = [reference_nll(llama, w) for w in chosen]
    tokens = count * (length - 1)

    result = pp.perplexity(llama, stream, length, count, bos, chunk_size=chunk_size)
    assert result.tokens == tokens
    assert result.windows == count
    assert result.length == length
    assert result.nll_sum == pytest.approx(sum(nll), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / tokens), rel=1e-6)

    for window, expected in zip(chosen, nll):
        got, scored = pp.window_nll(llama, torch.tensor([window]), chunk_size)
        assert scored == length - 1
        assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "family, extra",
    [
        ("gemma2", dict(head_dim=16)),  # final_logit_softcapping = 30
        ("cohere", dict(eos_token_id=0, bos_token_id=1, pad_token_id=2)),  # logit_scale = 0.0625
    ],
)
def test_chunked_loss_applies_the_models_own_logit_transform(family, extra):
    model = make_model(make_config(family, **extra))
    assert getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None)
    window = _random_stream(50, seed=5)
    expected = reference_nll(model, window)
    for chunk_size in (1, 7, 1024):
        got, scored = pp.window_nll(model, torch.tensor([window]), chunk_size)
        assert scored == 49
        assert got == pytest.approx(expected, rel=1e-6)


def test_progress_is_updated_once_per_window(llama):
    class Counter:
        calls = 0

        def update(self, n):
            self.calls += n

    counter = Counter()
    pp.perplexity(llama, _random_stream(200), 30, 4, None, progress=counter)
    assert counter.calls == 4


# ---------------------------------------------------------------- models of known perplexity

V = 11


def _successor(token: int) -> int:
    return (3 * token + 1) % V  # a permutation of 0..V-1


class _OneHotDecoder(torch.nn.Module):
    """Hidden state at position i = one-hot of ``rule(t[i])`` (the predicted next token)."""

    def __init__(self, rule):
        super().__init__()
        self.table = torch.tensor([rule(t) for t in range(V)])

    def forward(self, input_ids, use_cache=None):  # the eval passes use_cache=False
        hidden = torch.nn.functional.one_hot(self.table[input_ids], V).float()
        return SimpleNamespace(last_hidden_state=hidden)


class KnownLM(torch.nn.Module):
    """A causal LM exposing what the chunked loss uses: ``base_model_prefix``, a
    decoder returning ``last_hidden_state``, ``get_output_embeddings`` and
    ``config``. Its logits give ``margin`` to ``rule(t[i])`` and 0 to every
    other token."""

    base_model_prefix = "decoder"

    def __init__(self, margin: float, rule=_successor):
        super().__init__()
        self.decoder = _OneHotDecoder(rule)
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V) * margin)
        self.config = SimpleNamespace()

    def get_output_embeddings(self):
        return self.lm_head


def _periodic_stream(n: int, start: int = 0, rule=_successor) -> list[int]:
    stream = [start]
    while len(stream) < n:
        stream.append(rule(stream[-1]))
    return stream


@pytest.mark.parametrize("length, count", [(2, 9), (5, 4), (16, 3)])
def test_a_perfect_predictor_has_perplexity_one(length, count):
    stream = _periodic_stream(100)
    result = pp.perplexity(KnownLM(margin=100.0), stream, length, count, None, chunk_size=3)
    assert result.tokens == count * (length - 1)
    assert result.nll_sum == pytest.approx(0.0, abs=1e-6)
    assert result.perplexity == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bos", [None, 0])
def test_a_uniform_predictor_has_perplexity_equal_to_the_vocabulary(bos):
    result = pp.perplexity(KnownLM(margin=0.0), _periodic_stream(100), 10, 5, bos)
    assert result.perplexity == pytest.approx(V, rel=1e-6)  # float32 cross-entropy
    assert result.nll_sum == pytest.approx(5 * 9 * math.log(V), rel=1e-6)


def test_windows_are_weighted_per_token_not_averaged_per_window():
    """Window 1 follows the model's rule, window 2 never does: per-token NLL is
    a - m and a with a = log(e^m + V - 1), known in closed form."""
    length, margin = 9, 5.0
    span = length - 1
    good = _periodic_stream(span + 1)  # targets t1..t8 of window 1 all follow the rule
    bad = _periodic_stream(span + 1, start=(_successor(good[-1]) + 1) % V, rule=lambda t: (_successor(t) + 1) % V)
    stream = good + bad  # window 2 = t8..t16: t9 breaks the rule, and so does every later target
    assert len(stream) >= 2 * span + 1

    a = math.log(math.exp(margin) + V - 1)
    per_window_nll = [span * (a - margin), span * a]
    expected = math.exp(sum(per_window_nll) / (2 * span))
    mean_of_window_ppl = sum(math.exp(n / span) for n in per_window_nll) / 2

    result = pp.perplexity(KnownLM(margin), stream, length, 2, None, chunk_size=5)
    assert result.nll_sum == pytest.approx(sum(per_window_nll), rel=1e-6)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert abs(result.perplexity - mean_of_window_ppl) > 0.1 * mean_of_window_ppl


def test_a_model_without_an_output_embedding_is_refused():
    class Headless(KnownLM):
        def get_output_embeddings(self):
            return None

    with pytest.raises(InvalidParameterError) as info:
        pp.window_nll(Headless(1.0), torch.tensor([[0, 1, 2]]))
    assert "Headless" in str(info.value)
