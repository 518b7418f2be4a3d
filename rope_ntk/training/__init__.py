"""Fine-tuning with scaled RoPE (flow 3 of DESIGN.md): config, data, PoSE, trainer."""

from .config import PRESETS, TrainConfig
from .data import pack, pose_position_ids, split_documents, split_essays
from .trainer import documents, prepare_model, train

__all__ = [
    "PRESETS",
    "TrainConfig",
    "documents",
    "pack",
    "pose_position_ids",
    "prepare_model",
    "split_documents",
    "split_essays",
    "train",
]
