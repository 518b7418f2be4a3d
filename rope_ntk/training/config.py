"""What a fine-tuning run is: one dataclass, presets from the papers, validation.

Presets (every value can be overridden; see docs/finetuning.md for sources):

* ``pi``: linear position interpolation, Chen et al. 2023 (arXiv 2306.15595):
  1000 steps, learning rate 2e-5, 20 linear warmup steps, AdamW betas
  (0.9, 0.95), no weight decay.
* ``yarn``: YaRN, Peng et al. 2023 (arXiv 2309.00071): the same optimizer
  settings, 400 steps.

The papers train 7B+ models with a global batch of 64 sequences; the
presets keep the per-step schedule and leave the batch to the hardware
(``batch_size`` x ``grad_accum`` x processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import InvalidParameterError
from ..methods import get_method, validate_params

_OPTIMIZER = dict(lr=2e-5, warmup_steps=20, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0)
PRESETS: dict[str, dict[str, Any]] = {
    "pi": dict(method="linear", steps=1000, **_OPTIMIZER),
    "yarn": dict(method="yarn", steps=400, **_OPTIMIZER),
}
SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A fine-tuning run. Field comments become the ``--help`` of scripts/finetune.py."""

    out_dir: str = "runs/finetune"  # output directory: checkpoints, log.jsonl, final model
    model: str = "bundled"  # 'bundled', a model directory, a .gguf file or a hub id
    corpus: str = "bundled"  # 'bundled' essays, a .txt/.jsonl/.json file, a dataset folder or a datasets name
    corpus_split: str = "train"  # split of a datasets corpus
    text_field: str = "text"  # text field of .jsonl / .json / datasets records
    corpus_config: str | None = None  # datasets configuration name, if the dataset has several
    heldout_fraction: float = 0.1  # share of the corpus characters held out from training (whole documents)
    method: str = "yarn"  # rope_ntk method patched in before training
    factor: float = 2.0  # scaling factor of the method
    rope_params: dict[str, Any] = field(default_factory=dict)  # further method parameters
    steps: int = 400  # optimizer steps
    lr: float = 2e-5  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to lr
    schedule: str = "constant"  # after warmup: constant or cosine (to 10% of lr)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    batch_size: int = 1  # sequences per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    window: int = 2048  # tokens per training sequence
    pose: bool = False  # PoSE: spread each window's position ids over target_length
    target_length: int | None = None  # PoSE target context (default: factor x original context)
    pose_chunks: int = 2  # PoSE: chunks per window
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; master weights stay float32)
    gradient_checkpointing: bool = False
    lora: bool = False  # train LoRA adapters (needs peft) instead of all weights
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_train_embeddings_and_norms: bool = True  # LongLoRA: also train embeddings and norms fully
    save_every: int = 100  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # checkpoints kept on disk
    log_every: int = 1  # log every N steps
    tensorboard: bool = False  # also log to OUT/tensorboard (needs tensorboard installed)
    seed: int = 0  # data split, data order, PoSE positions, initial RNG state
    threads: int | None = None  # torch CPU threads (None: torch's default)

    @classmethod
    def from_preset(cls, preset: str | None, **overrides: Any) -> "TrainConfig":
        """The preset's values, then ``overrides`` (None values are ignored)."""
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise InvalidParameterError(f"preset={preset!r} is not a preset; valid: {', '.join(PRESETS)}.")
            values.update(PRESETS[preset])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidParameterError(f"unknown TrainConfig field(s): {', '.join(unknown)}.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def method_params(self) -> dict[str, Any]:
        name = get_method(self.method).name
        params = dict(self.rope_params)
        if name != "none":
            params.setdefault("factor", self.factor)
        return params

    def validate(self) -> None:
        """Raise InvalidParameterError naming every bad field at once."""
        problems = []

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                problems.append(f"{name}={value!r} must be an integer >= {minimum}")

        def number(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                problems.append(f"{name}={value!r} must be a finite number {bound}" + (f" and <= {high}" if high < math.inf else ""))

        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "pose_chunks", "lora_rank"):
            positive_int(name)
        for name in ("warmup_steps", "save_every"):
            positive_int(name, 0)
        positive_int("window", 2)
        number("lr", 0.0, low_open=True)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0)
        number("adam_beta1", 0.0, 1.0)
        number("adam_beta2", 0.0, 1.0)
        number("heldout_fraction", 0.0, 0.9)
        number("lora_alpha", 0.0, low_open=True)
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is not a schedule; valid: {', '.join(SCHEDULES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision={self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
        try:
            validate_params(self.method, self.method_params())
        except InvalidParameterError as exc:
            problems.append(f"method={self.method!r}: {str(exc).rstrip('.')}")
        if self.target_length is not None:
            if not self.pose:
                problems.append("target_length is set but pose is off; add --pose or drop --target-length")
            elif isinstance(self.target_length, bool) or not isinstance(self.target_length, int):
                problems.append(f"target_length={self.target_length!r} must be an integer")
            elif isinstance(self.window, int) and self.target_length < self.window:
                problems.append(
                    f"window={self.window} is longer than target_length={self.target_length}; PoSE spreads a "
                    "window over a longer target, so target_length must be >= window"
                )
        if isinstance(self.pose_chunks, int) and isinstance(self.window, int) and self.pose_chunks > self.window:
            problems.append(f"pose_chunks={self.pose_chunks} must be <= window={self.window}")
        if problems:
            raise InvalidParameterError("; ".join(problems) + ".")
