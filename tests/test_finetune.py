"""Fine-tuning (rope_ntk.training) on a tiny Llama over the bundled tokenizer.

Runs are in process, float32, one torch thread (conftest), so two runs of
the same config are bit-identical and a resumed run can be compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rope_ntk
from evalkit import bundled_tokenizer, corpus_text, save_tiny_lm
from rope_ntk.errors import InvalidParameterError
from rope_ntk.training import TrainConfig, data, train
from rope_ntk.training.cli import main as cli_main
from rope_ntk.training.trainer import lm_forward

WINDOW = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    model = save_tiny_lm(root / "tiny")
    corpus = root / "docs.jsonl"
    with corpus.open("w") as handle:
        for i in range(12):
            handle.write(json.dumps({"text": f"Record {i} begins. " + corpus_text(250, seed=i)}) + "\n")
    return {"model": model, "corpus": corpus, "root": root}


def config(assets, out: Path, **overrides) -> TrainConfig:
    values = dict(
        out_dir=str(out), model=str(assets["model"]), corpus=str(assets["corpus"]), method="yarn",
        factor=2.0, steps=6, lr=3e-3, warmup_steps=1, window=WINDOW, save_every=2, threads=1,
    )
    return TrainConfig.from_preset("yarn", **{**values, **overrides})


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def test_loss_decreases(assets, tmp_path):
    train(config(assets, tmp_path, steps=12, save_every=0))
    curve = losses(tmp_path)
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5, curve


def test_resume_reproduces_the_uninterrupted_run(assets, tmp_path):
    kwargs = dict(pose=True, target_length=4 * WINDOW, grad_accum=2, batch_size=2)
    train(config(assets, tmp_path / "full", **kwargs))
    stopped = config(assets, tmp_path / "resumed", **kwargs)
    train(stopped, stop_after=3)
    assert not (tmp_path / "resumed" / "model").exists()
    assert len(losses(tmp_path / "resumed")) == 3
    train(stopped, resume=True)

    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # exact: same floats
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # only the newest keep_checkpoints complete checkpoints stay
    kept = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert kept == ["checkpoint-000004", "checkpoint-000006"]


def test_saved_model_reloads_with_identical_logits(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    train(config(assets, tmp_path, steps=2))
    saved = tmp_path / "model"
    assert json.loads((saved / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"

    # the trained weights: the last checkpoint, loaded into the base model patched the same way
    trained, _ = rope_ntk.load_model(str(assets["model"]))
    rope_ntk.patch(trained, "yarn", factor=2.0)
    state = torch.load(tmp_path / "checkpoint-000002" / "pytorch_model.bin", weights_only=True)
    trained.load_state_dict(state, strict=False)
    ids = torch.randint(0, 1000, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(saved).eval()  # yarn is native: no rope_ntk
        assert torch.equal(plain(ids).logits, want)
        ours, _ = rope_ntk.load_model(str(saved))
        assert torch.equal(ours(ids).logits, want)
    base, _ = rope_ntk.load_model(str(assets["model"]))
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, want)  # training changed something


def test_pose_position_ids_properties():
    window, target, chunks = 32, 256, 3
    seen = torch.zeros(target, dtype=torch.bool)
    for sample in range(400):
        ids = data.pose_position_ids(window, target, chunks, data.pose_generator(7, sample))
        assert ids.shape == (window,)
        steps = ids[1:] - ids[:-1]
        assert (steps >= 1).all()  # strictly increasing: relative order kept
        assert (steps == 1).sum() >= window - chunks  # at most chunks - 1 jumps: chunks stay contiguous
        assert 0 <= ids.min() and ids.max() < target
        seen[ids] = True
    assert seen.all(), f"positions never drawn: {(~seen).nonzero().flatten().tolist()}"
    again = data.pose_position_ids(window, target, chunks, data.pose_generator(7, 5))
    assert torch.equal(again, data.pose_position_ids(window, target, chunks, data.pose_generator(7, 5)))


def test_pose_window_attends_across_skips(assets):
    """A later chunk sees the tokens of an earlier one (no packed-sequence cut at the skip)."""
    model, _ = rope_ntk.load_model(str(assets["model"]))
    ids = torch.randint(10, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(8), torch.arange(8) + 100])[None]
    changed = ids.clone()
    changed[0, 2] += 1
    with torch.no_grad():
        a, b = lm_forward(model, ids, positions).logits, lm_forward(model, changed, positions).logits
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_split_is_document_level_and_deterministic():
    docs = [f"doc {i} " * (10 + i) for i in range(30)]
    train_ids, heldout = data.split_documents(docs, 0.2, seed=3)
    assert sorted(train_ids + heldout) == list(range(30)) and not set(train_ids) & set(heldout)
    assert 0 < sum(len(docs[i]) for i in heldout) <= 0.2 * sum(map(len, docs))
    assert (train_ids, heldout) == data.split_documents(docs, 0.2, seed=3)
    assert heldout != data.split_documents(docs, 0.2, seed=4)[1]
    # a document larger than the held-out budget is never held out
    big = docs + ["x" * 10**5]
    assert 30 not in data.split_documents(big, 0.2, seed=3)[1]


def test_split_essays_cuts_before_dated_headers():
    text = "April 2012A first essay. In May 2001 it rained.January 2015Second one.Untitled tail."
    assert data.split_essays(text) == ["April 2012A first essay. In May 2001 it rained.", "January 2015Second one.Untitled tail."]


def test_heldout_documents_are_written_and_never_trained(assets, tmp_path):
    cfg = config(assets, tmp_path, steps=1, heldout_fraction=0.25)
    train(cfg)
    split = json.loads((tmp_path / "split.json").read_text())
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    docs = rope_ntk.load_corpus(str(assets["corpus"]))
    assert [h["doc_id"] for h in held] == split["heldout_ids"] and held
    assert all(h["text"] == docs[h["doc_id"]] for h in held)
    tokenizer = bundled_tokenizer()
    text = tokenizer.decode(data.pack(tokenizer, [docs[i] for i in split["train_ids"]], WINDOW).flatten())
    found = {i for i in range(len(docs)) if f"Record {i} begins." in text}
    # every training document is packed (except at most the dropped tail), no held-out one
    assert found <= set(split["train_ids"]) and len(found) >= len(split["train_ids"]) - 1


def test_pack_puts_eos_between_documents():
    tokenizer = bundled_tokenizer()
    docs = ["one two three", "four five", "six seven eight nine"]
    lengths = [len(tokenizer(d, add_special_tokens=False).input_ids) for d in docs]
    total = sum(lengths) + len(docs)
    blocks = data.pack(tokenizer, docs, 4)
    assert blocks.shape == (total // 4, 4)
    flat = blocks.flatten().tolist()
    assert flat[lengths[0]] == tokenizer.eos_token_id
    assert flat[lengths[0] + 1 + lengths[1]] == tokenizer.eos_token_id


def test_one_process_reads_what_two_processes_read():
    one = [data.sample_index(5, m, 0, r, 2, 4, 1) for m in range(4) for r in range(2)]
    two = [data.sample_index(5, m, p, r, 2, 2, 2) for m in range(2) for p in range(2) for r in range(2)]
    assert one == two == list(range(40, 48))
    order = [data.block_of(s, 10, seed=0) for s in range(20)]
    assert sorted(order[:10]) == list(range(10)) == sorted(order[10:]) and order[:10] != order[10:]


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    train(config(assets, tmp_path / "a", steps=2, save_every=0))
    train(config(assets, tmp_path / "b", steps=2, save_every=0, gradient_checkpointing=True))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)


def test_lora_trains_adapters_embeddings_and_norms(assets, tmp_path):
    pytest.importorskip("peft")
    train(config(assets, tmp_path, steps=2, lora=True, lora_targets=("q_proj", "v_proj")))
    saved = weights(tmp_path)
    assert not any("lora" in k for k in saved)  # merged into the base weights
    base = load_file(assets["model"] / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    assert any("q_proj" in k for k in changed) and any("norm" in k for k in changed)
    assert any("embed_tokens" in k for k in changed)
    assert not any("k_proj" in k or "mlp" in k for k in changed)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--preset", "longlora"], "preset='longlora'"),
        (["--method", "warp"], "method='warp'"),
        (["--steps", "0"], "steps=0"),
        (["--lr", "0"], "lr=0.0"),
        (["--lr=-1e-5"], "lr=-1e-05"),
        (["--pose", "--window", "512", "--target-length", "256"], "window=512"),
        (["--corpus", "missing.jsonl"], "corpus='missing.jsonl'"),
    ],
)
def test_bad_arguments_name_the_argument(assets, tmp_path, capsys, argv, named):
    base = ["--model", str(assets["model"]), "--corpus", str(assets["corpus"]), "--out-dir", str(tmp_path / "o")]
    assert cli_main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and named in err, err


def test_config_validation_collects_problems():
    with pytest.raises(InvalidParameterError) as info:
        TrainConfig(steps=-1, lr=0.0, batch_size=0).validate()
    assert all(s in str(info.value) for s in ("steps=-1", "lr=0.0", "batch_size=0"))


def test_trains_on_a_local_dataset_folder_through_datasets(assets, tmp_path):
    """A folder goes through datasets.load_dataset, the path a hub name takes too."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text((assets["corpus"]).read_text())
    out = tmp_path / "run"
    train(config(assets, out, corpus=str(folder), corpus_split="train", steps=1, save_every=0))
    held = [json.loads(line)["text"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert held and all(h.startswith("Record ") for h in held)


def test_a_second_run_into_the_same_out_dir_needs_resume(assets, tmp_path):
    train(config(assets, tmp_path, steps=1))
    with pytest.raises(InvalidParameterError, match="out_dir=.*--resume"):
        train(config(assets, tmp_path, steps=1))
