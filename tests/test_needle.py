"""Needle in a haystack: prompts built with the real SmolLM2 tokenizer over
the bundled essays (no model weights), scoring on tiny Llamas, the heatmap."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from evalkit import bundled_tokenizer, tiny_lm_for

import rope_ntk
from rope_ntk.errors import InvalidParameterError
from rope_ntk.evaluation import needle as nd
from rope_ntk.evaluation import scoring
from rope_ntk.evaluation.haystack import Haystack, sentences

KEY, VALUE = "cobalt", "4071956"


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def essays():
    return rope_ntk.load_corpus("bundled")


@pytest.fixture(scope="module")
def haystacks(tokenizer, essays):
    return {n: Haystack(tokenizer, "essay", essays, max_tokens=n) for n in (512, 2048, 4096)}


def needle_tokens(tokenizer, prompt: scoring.Prompt, needle: str) -> tuple[int, int, list[int]]:
    """(first, end) token indices covering the needle's characters, and the prompt ids."""
    encoded = tokenizer(prompt.text, return_offsets_mapping=True)
    assert encoded.input_ids == prompt.input_ids
    start = prompt.text.index(needle)
    end = start + len(needle)
    covering = [i for i, (a, b) in enumerate(encoded.offset_mapping) if a < end and b > start]
    return covering[0], covering[-1] + 1, encoded


def test_sentences_join_back_into_the_text(essays):
    text = essays[0][:50_000]
    units = sentences(text)
    assert "".join(units) == text
    assert all(u.rstrip()[-1:] in ".!?\"')]\u2019\u201d" for u in units[:-1])
    assert len(units) > 100


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("length", [512, 2048, 4096])
def test_needle_once_contiguous_at_its_depth(tokenizer, haystacks, length, depth):
    hay = haystacks[length]
    prompt = nd.build_prompt(scoring.Encoder(tokenizer), hay, length, depth, KEY, VALUE)
    needle = nd.NEEDLE.format(key=KEY, value=VALUE)
    n_units = prompt.info["units"]

    # the bound, and as full as one more sentence allows
    n = len(prompt.input_ids)
    assert n <= length
    assert n >= length - (hay.cum[n_units + 1] - hay.cum[n_units]) - 4, (n, length)

    # once, whole sentences around it
    assert prompt.text.count(needle) == 1 and prompt.text.count(VALUE) == 1
    start = prompt.text.index(needle)
    before = prompt.text[len(nd.INSTRUCTION) : start]
    assert before == "" or before[-1].isspace()
    assert before.strip() == "".join(hay.units[: len(sentences(before))]).strip()

    # its tokens: contiguous, exactly the needle (up to leading white space), found once
    first, end, encoded = needle_tokens(tokenizer, prompt, needle)
    ids = prompt.input_ids
    assert tokenizer.decode(ids[first:end]).strip() == needle
    span = ids[first:end]
    hits = [i for i in range(len(ids) - len(span) + 1) if ids[i : i + len(span)] == span]
    assert hits == [first]

    # depth in tokens of the haystack (instruction and question excluded), within one sentence
    offsets = encoded.offset_mapping
    hay_first = next(i for i, (a, _) in enumerate(offsets) if a >= len(nd.INSTRUCTION))
    question_at = prompt.text.index(nd.QUESTION.format(key=KEY))
    hay_end = next(i for i, (a, _) in enumerate(offsets) if a >= question_at)
    hay_tokens = hay_end - hay_first - (end - first)
    measured = (first - hay_first) / hay_tokens
    longest = max(hay.cum[i + 1] - hay.cum[i] for i in range(n_units))
    assert abs(measured - depth) <= (longest + 3) / hay_tokens, (measured, depth, longest, hay_tokens)


def test_noise_haystack_places_the_needle_between_filler_lines(tokenizer):
    hay = Haystack(tokenizer, "noise", max_tokens=1024)
    prompt = nd.build_prompt(scoring.Encoder(tokenizer), hay, 1024, 0.5, KEY, VALUE)
    needle = nd.NEEDLE.format(key=KEY, value=VALUE)
    body = prompt.text[len(nd.INSTRUCTION) : prompt.text.index(nd.QUESTION.format(key=KEY))]
    before, _, after = body.partition(needle + " ")
    assert before.replace(hay.units[0], "") == "" and after.replace(hay.units[0], "") == ""
    a, b = len(before) // len(hay.units[0]), len(after) // len(hay.units[0])
    assert abs(a - b) <= 1
    assert len(prompt.input_ids) <= 1024


def test_chat_template_prompt(tokenizer, haystacks):
    plain = nd.build_prompt(scoring.Encoder(tokenizer), haystacks[2048], 2048, 0.5, KEY, VALUE)
    chat = nd.build_prompt(scoring.Encoder(tokenizer, chat_template=True), haystacks[2048], 2048, 0.5, KEY, VALUE)
    assert len(chat.input_ids) <= 2048
    assert chat.text.startswith("<|im_start|>") and "<|im_start|>user\n" + nd.INSTRUCTION in chat.text
    assert chat.text.endswith("<|im_start|>assistant\n" + nd.PREFIX.format(key=KEY).strip())
    assert plain.text.endswith(nd.QUESTION.format(key=KEY) + nd.PREFIX.format(key=KEY))
    assert chat.input_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant
    assert chat.info["units"] <= plain.info["units"]  # the template costs tokens


def test_chat_template_missing_is_an_error(tokenizer):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(InvalidParameterError, match="chat_template=True"):
        scoring.Encoder(bare, chat_template=True)
    scoring.Encoder(bare, chat_template=False)


def test_too_short_length_names_the_length(tokenizer, haystacks):
    with pytest.raises(InvalidParameterError, match="length=40 is too short"):
        nd.build_prompt(scoring.Encoder(tokenizer), haystacks[512], 40, 0.5, KEY, VALUE)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"depths": [0.5, 1.5]}, "depth=1.5"),
        ({"depths": [-0.1]}, "depth=-0.1"),
        ({"depths": [math.nan]}, "depth=nan"),
        ({"depths": []}, "depths=[]"),
        ({"trials": 0}, "trials=0"),
        ({"scoring": "judge"}, "scoring='judge'"),
        ({"haystack": "pg19"}, "haystack='pg19'"),
        ({"chat_template": "yes"}, "chat_template='yes'"),
        ({"num_keys": 2}, "num_keys"),
    ],
)
def test_bad_params_name_the_argument(params, fragment):
    with pytest.raises(InvalidParameterError) as info:
        nd.validate_needle(params)
    assert fragment in str(info.value)


def test_defaults_validate_to_themselves():
    assert nd.validate_needle({}) == nd.NEEDLE_DEFAULTS
    assert nd.validate_needle({"depths": [0, 1]})["depths"] == [0.0, 1.0]


def test_needles_are_a_function_of_their_coordinates():
    assert nd.needle_for(0, 4096, 1, 0) == nd.needle_for(0, 4096, 1, 0)
    values = {nd.needle_for(s, 4096, d, t)[1] for s in range(3) for d in range(5) for t in range(2)}
    assert len(values) == 30 and all(len(v) == 7 for v in values)


# ---------------------------------------------------------------- scoring on tiny models


def test_argmax_hits_is_greedy_decoding(tokenizer):
    """One forward over prompt + the model's own greedy tokens: every one is the argmax;
    a replaced token is not, and the tokens before it still are."""
    model = tiny_lm_for(tokenizer, max_position_embeddings=512)
    prompt = tokenizer("The grass is green and the sky is blue. The pass key is").input_ids
    greedy, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    assert scoring.argmax_hits(model, prompt, greedy) == [True] * 6
    wrong = greedy[:3] + [(greedy[3] + 1) % len(tokenizer)] + greedy[4:]
    assert scoring.argmax_hits(model, prompt, wrong)[:4] == [True, True, True, False]


def test_teacher_forcing_and_generation_agree(tokenizer, haystacks):
    """A needle prompt whose 'answer' is the tiny model's own greedy output passes both
    ways; the real value fails both ways."""
    model = tiny_lm_for(tokenizer, max_position_embeddings=1024)
    prompt = nd.build_prompt(scoring.Encoder(tokenizer), haystacks[512], 512, 0.5, KEY, VALUE)
    continuation = scoring.greedy_continuation(model, tokenizer, prompt.input_ids, 4)
    ids = tokenizer(continuation, add_special_tokens=False).input_ids
    # keep the leading tokens that survive a decode/encode round trip
    while ids and tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids != ids:
        ids = ids[:-1]
    assert ids, continuation
    own = tokenizer.decode(ids)
    assert own.strip()
    mine = scoring.Prompt(prompt.text, prompt.input_ids, [own.strip()], own, {"depth": 0.5})
    for way in scoring.SCORINGS:
        trial = scoring.score(model, tokenizer, mine, way, max_new_tokens=len(ids))
        assert trial["found"] == [True], (way, trial)
        trial = scoring.score(model, tokenizer, prompt, way, max_new_tokens=8)
        assert trial["found"] == [False] and trial["score"] == 0, (way, trial)


def test_run_needle_on_a_tiny_model(tokenizer, essays):
    model = tiny_lm_for(tokenizer, max_position_embeddings=1024)
    params = {"depths": [0.0, 0.5, 1.0], "trials": 2}
    results = {}
    for way in scoring.SCORINGS:
        progress = Counter()
        results[way] = nd.run_needle(model, tokenizer, essays, 512, {**params, "scoring": way}, seed=3,
                                     progress=progress)
        assert progress.n == 6
    for way, result in results.items():
        json.dumps(result, allow_nan=False)
        assert result["trials"] == 6 and len(result["details"]) == 6
        assert [t["depth"] for t in result["details"]] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
        assert result["accuracy"] == sum(t["score"] for t in result["details"]) / 6
        assert all(t["prompt_tokens"] <= 512 for t in result["details"])
    gen, tf = results["generate"]["details"], results["teacher-forcing"]["details"]
    assert [t["expected"] for t in gen] == [t["expected"] for t in tf]  # same prompts
    for g, t in zip(gen, tf):  # the answer's tokens all argmax => greedy decoding writes them
        assert not t["found"][0] or g["found"][0]


class Counter:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_grid_and_heatmap(tmp_path):
    records = [
        {"length": 4096, "details": [{"depth": 0.0, "score": 1.0}, {"depth": 0.5, "score": 0.0},
                                     {"depth": 0.5, "score": 1.0}]},
        {"length": 8192, "details": [{"depth": 0.0, "score": 0.0}]},
    ]
    depths, lengths, table = nd.grid(records)
    assert depths == [0.0, 0.5] and lengths == [4096, 8192]
    assert table == [[1.0, 0.0], [0.5, None]]
    pytest.importorskip("matplotlib")
    path = tmp_path / "heat.png"
    assert nd.heatmap(records, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_token_tied_with_the_maximum_counts_as_argmax(tokenizer):
    """bfloat16 logits tie exactly; a tied answer token passes (greedy could pick it)."""
    model = tiny_lm_for(tokenizer, max_position_embeddings=512)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: every token is an argmax
    prompt = tokenizer("The pass key is").input_ids
    assert scoring.argmax_hits(model, prompt, [5, 17, 4000]) == [True, True, True]
