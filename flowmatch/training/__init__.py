"""Training: the loop, EMA, learning-rate schedules and atomic, resumable checkpoints."""

from flowmatch.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowmatch.components import (
    build_model_from_config,
    latent_info,
    load_autoencoder_for,
)
from flowmatch.run import model_from_checkpoint
from flowmatch.training.ema import EMA, ema_decay_from_halflife
from flowmatch.training.lr import lr_at
from flowmatch.training.trainer import (
    BatchStream,
    NonFiniteLossError,
    Trainer,
    TrainResult,
)

__all__ = [
    "BatchStream",
    "CheckpointError",
    "EMA",
    "NonFiniteLossError",
    "Trainer",
    "TrainResult",
    "build_model_from_config",
    "ema_decay_from_halflife",
    "find_checkpoint",
    "latent_info",
    "load_autoencoder_for",
    "load_checkpoint",
    "lr_at",
    "model_from_checkpoint",
    "save_checkpoint",
]
