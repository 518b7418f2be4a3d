"""Command line of scripts/finetune.py: a preset, then any field overridden by a flag."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields

from ..cli import fail, interrupted, setup_logging
from ..errors import RopeNtkError
from ..methods import METHODS
from .config import PRESETS, TrainConfig

# flag help, by field; booleans become --flag / --no-flag
HELP = {
    "out_dir": "output directory: checkpoints, log.jsonl, heldout.jsonl, model/",
    "model": "'bundled' (SmolLM2-135M GGUF), a model directory, a .gguf file or a hub id",
    "corpus": "'bundled' (Paul Graham essays), a .txt/.jsonl/.json file, a dataset folder or a datasets name",
    "corpus_split": "split of a datasets corpus",
    "text_field": "text field of .jsonl/.json/datasets records",
    "corpus_config": "datasets configuration name",
    "heldout_fraction": "share of the corpus characters held out, as whole documents (0: none)",
    "method": "RoPE method patched in before training (see the list below)",
    "factor": "scaling factor of the method",
    "steps": "optimizer steps",
    "lr": "peak learning rate",
    "warmup_steps": "linear warmup steps from 0 to lr",
    "schedule": "after warmup: constant or cosine (to 10%% of lr)",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "batch_size": "sequences per process per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "window": "tokens per training sequence",
    "pose": "PoSE: spread each window's position ids over --target-length",
    "target_length": "PoSE target context (default: factor x the model's context)",
    "pose_chunks": "PoSE chunks per window",
    "mixed_precision": "no, bf16 or fp16 autocast; master weights stay float32",
    "gradient_checkpointing": "recompute activations in backward (less memory, ~30%% slower)",
    "lora": "train LoRA adapters (needs peft: pip install 'rope-ntk[lora]')",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha",
    "lora_targets": "comma-separated module names that get LoRA adapters",
    "lora_train_embeddings_and_norms": "LongLoRA: train embeddings and norms fully alongside LoRA",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "checkpoints kept on disk",
    "log_every": "write log.jsonl every N steps",
    "tensorboard": "also log to OUT/tensorboard (needs tensorboard installed)",
    "seed": "seed of the split, the data order, PoSE positions and RNG",
    "threads": "torch CPU threads",
}


def _param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--rope-param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    presets = "\n".join(f"  {name:<6} {', '.join(f'{k}={v}' for k, v in values.items())}" for name, values in PRESETS.items())
    methods = "\n".join(f"  {m.name:<12} {m.paper}" for m in METHODS.values())
    parser = argparse.ArgumentParser(
        description="Fine-tune a causal LM with scaled RoPE (runs under `accelerate launch` too).",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets (any value can be overridden by its flag):\n{presets}\n\nmethods:\n{methods}\n\n"
        "Docs: docs/finetuning.md. Evaluate on OUT/heldout.jsonl, e.g.\n"
        "  python eval/perplexity.py --model OUT/model --corpus OUT/heldout.jsonl --methods yarn",
    )
    parser.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)} (default: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    parser.add_argument("--rope-param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                        help="a further method parameter, e.g. beta_fast=32 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for f in fields(TrainConfig):
        if f.name == "rope_params":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{HELP.get(f.name, f.name)} (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=None, help=text)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, default=None, help=text)
        elif isinstance(default, int) or f.name in ("target_length", "threads"):
            parser.add_argument(flag, type=int, default=None, help=text)
        else:
            parser.add_argument(flag, default=None, help=text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - {"rope_params"}
    overrides = {name: getattr(args, name) for name in names}
    overrides["rope_params"] = dict(args.rope_param) or None
    return TrainConfig.from_preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
    from .trainer import train

    try:
        config = config_from_args(args)
        config.validate()
        target = train(config, resume=args.resume)
    except RopeNtkError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted(f"re-run with --resume to continue from the last checkpoint in {args.out_dir or TrainConfig.out_dir}")
    print(f"model: {target}  log: {config.out_dir}/log.jsonl  held-out text: {config.out_dir}/heldout.jsonl")
    return 0
