"""The training loop: patch, train on accelerate, checkpoint, save.

One function, ``train(config)``, runs the whole of flow 3 in DESIGN.md. It
runs unchanged in one process or under ``accelerate launch`` (DDP, FSDP,
DeepSpeed; see configs/accelerate/). Outputs in ``config.out_dir``:

* ``train_config.json``  the resolved config;
* ``split.json``, ``heldout.jsonl``  the document split and the held-out
  documents (evaluate on ``heldout.jsonl``: text never trained on);
* ``log.jsonl``  one line per logged step: loss, lr, grad norm, tokens/s;
* ``checkpoint-NNNNNN/``  the last ``keep_checkpoints`` checkpoints;
* ``model/``  the final model and tokenizer; its config carries the scaling.

Resuming (``resume=True``) restores model, optimizer, scheduler and RNG
states from the newest checkpoint; the data order and PoSE positions are
functions of the step (see ``data.py``), so the run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import patching
from ..data import BUNDLED_CORPUS, load_corpus
from ..errors import InvalidParameterError
from ..loading import load_model
from ..saving import save_pretrained
from . import checkpoint, data
from .config import TrainConfig

logger = logging.getLogger(__name__)


def documents(config: TrainConfig) -> list[str]:
    """The corpus as documents (the bundled essays file cut into essays)."""
    docs = load_corpus(config.corpus, split=config.corpus_split, text_field=config.text_field, config=config.corpus_config)
    if config.corpus == BUNDLED_CORPUS:
        docs = [essay for doc in docs for essay in data.split_essays(doc)]
    return docs


def target_length(config: TrainConfig, model) -> int:
    """PoSE target: ``target_length``, else factor x the model's original context."""
    if config.target_length is not None:
        return config.target_length
    original = getattr(model.config, "max_position_embeddings", None) or config.window
    return int(round(config.method_params().get("factor", 1.0) * original))


def lr_lambda(config: TrainConfig):
    """Multiplier of ``lr`` at each step: linear warmup, then constant or cosine to 10%."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _apply_lora(model, config: TrainConfig):
    try:
        import peft
    except ImportError:
        raise InvalidParameterError("lora=True needs peft: pip install 'rope-ntk[lora]'.") from None
    lora = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets),
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    if config.lora_train_embeddings_and_norms:  # LongLoRA (arXiv 2309.12307): LoRA alone is not enough
        for name, param in model.named_parameters():
            if "embed" in name or "norm" in name:
                param.requires_grad_(True)
    return model


def _drop_gguf_marker(model) -> None:
    """A GGUF model is loaded dequantized to float32 but stays marked as
    quantized, which makes ``save_pretrained`` refuse; once trained it is a
    plain float model, so the marker goes."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def prepare_model(config: TrainConfig):
    """(model patched with the config's method, tokenizer), ready to train."""
    model, tokenizer = load_model(config.model, dtype="float32")
    _drop_gguf_marker(model)
    patching.patch(model, config.method, **config.method_params())
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's new name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if config.lora:
        model = _apply_lora(model, config)
    model.train()
    return model, tokenizer


def _write_split(config: TrainConfig, docs: list[str], train_ids, heldout_ids, out: Path) -> None:
    split = {
        "corpus": config.corpus, "corpus_split": config.corpus_split, "seed": config.seed,
        "heldout_fraction": config.heldout_fraction, "documents": len(docs),
        "train_ids": train_ids, "heldout_ids": heldout_ids,
        "heldout_chars": sum(len(docs[i]) for i in heldout_ids),
    }
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    with (out / "heldout.jsonl").open("w", encoding="utf-8") as handle:
        for i in heldout_ids:
            handle.write(json.dumps({"doc_id": i, "text": docs[i]}) + "\n")


class _Log:
    """log.jsonl (main process), optional tensorboard."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled, self.path, self.writer = enabled, out / "log.jsonl", None
        if not enabled:
            return
        if self.path.exists():  # drop steps after the checkpoint: they are recomputed
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InvalidParameterError("tensorboard=True needs the tensorboard package (pip install tensorboard).") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run (or resume) ``config``; return the final model directory.

    ``stop_after`` ends the loop after that step, checkpointed, without
    saving a final model (used to test resuming).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    resume_from = checkpoint.latest(out)
    if resume_from is not None and not resume:  # every process raises: none waits for the others
        raise InvalidParameterError(f"out_dir={str(out)!r} already holds checkpoints; pass --resume or use a new out_dir.")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)

    docs = documents(config)
    train_ids, heldout_ids = data.split_documents(docs, config.heldout_fraction, config.seed)
    model, tokenizer = prepare_model(config)
    target = target_length(config, model)
    if config.pose and target < config.window:
        raise InvalidParameterError(f"window={config.window} is longer than the PoSE target_length={target}.")
    blocks = data.pack(tokenizer, [docs[i] for i in train_ids], config.window)
    if accelerator.is_main_process:
        _write_split(config, docs, train_ids, heldout_ids, out)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    logger.info("config: %s", config)
    logger.info("processes: %d (%s)", accelerator.num_processes, accelerator.distributed_type)
    logger.info("%d training blocks of %d tokens; %d held-out documents; PoSE target %s",
                len(blocks), config.window, len(heldout_ids), target if config.pose else "off")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # not prepared: accelerate would step a prepared scheduler once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_lambda(config))
    accelerator.register_for_checkpointing(scheduler)

    start = 0
    if resume_from is not None:
        start = checkpoint.load(accelerator, resume_from)["step"]
        logger.info("resumed from %s at step %d", resume_from, start)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting at step 0", out)
    log = _Log(out, start, config.tensorboard, accelerator.is_main_process)
    end = config.steps if stop_after is None else min(config.steps, stop_after)

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not accelerator.is_main_process)
    for step in range(start, end):
        started, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        loss, grad_norm = _step(model, optimizer, scheduler, accelerator, blocks, config, target, step)
        tokens = config.window * config.batch_size * config.grad_accum * accelerator.num_processes
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / (time.perf_counter() - started)}
        if (step + 1) % config.log_every == 0 or step + 1 == end:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == end:
            checkpoint.save(accelerator, out, step + 1, {"config": dataclasses.asdict(config)}, config.keep_checkpoints)
    bar.close()
    if end < config.steps:
        return out
    return _save_final(accelerator, model, tokenizer, config, out)


def lm_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """Causal LM forward [batch, window] with next-token loss over the whole window.

    The all-ones mask is explicit: without one, transformers reads jumps in
    ``position_ids`` (PoSE skips) as the boundaries of packed sequences and
    would cut attention there.
    """
    mask = torch.ones_like(input_ids)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, labels=input_ids)


def _batch(blocks: torch.Tensor, config: TrainConfig, target: int, step: int, micro: int, process: int, processes: int):
    rows, positions = [], []
    for row in range(config.batch_size):
        sample = data.sample_index(step, micro, process, row, config.batch_size, config.grad_accum, processes)
        rows.append(blocks[data.block_of(sample, len(blocks), config.seed)])
        if config.pose:
            generator = data.pose_generator(config.seed, sample)
            positions.append(data.pose_position_ids(config.window, target, config.pose_chunks, generator))
        else:
            positions.append(torch.arange(config.window))
    return torch.stack(rows), torch.stack(positions)


def _step(model, optimizer, scheduler, accelerator, blocks, config: TrainConfig, target: int, step: int):
    """One optimizer step over ``grad_accum`` micro-batches; -> (mean loss, grad norm)."""
    total = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        input_ids, position_ids = _batch(
            blocks, config, target, step, micro, accelerator.process_index, accelerator.num_processes
        )
        input_ids, position_ids = input_ids.to(accelerator.device), position_ids.to(accelerator.device)
        sync = contextlib.nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = lm_forward(model, input_ids, position_ids).loss
        accelerator.backward(loss / config.grad_accum)
        total += loss.detach().float()
    grad_norm = float("nan")
    if config.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    mean = accelerator.reduce(total / config.grad_accum, reduction="mean")
    return float(mean), grad_norm


def _save_final(accelerator, model, tokenizer, config: TrainConfig, out: Path) -> Path:
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    target = out / "model"
    if config.lora:
        model = model.merge_and_unload()
    state = accelerator.get_state_dict(model, unwrap=False)  # every process: FSDP gathers shards
    if accelerator.is_main_process:
        model.eval()
        if config.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.config.use_cache = True
        save_pretrained(model, target, state_dict=state)
        tokenizer.save_pretrained(target)
        logger.info("saved the fine-tuned model to %s", target)
    accelerator.wait_for_everyone()
    return target
