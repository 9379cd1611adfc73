"""Training: batch sources, objectives, the shared update / checkpoint / log pieces, and the Trainer
that composes them; EMA, learning-rate schedules. For a custom loop: :class:`FlowMatchingLoss`,
:class:`CoupledBatches` (minibatch OT with a prefetch thread), :class:`BatchStream`."""

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
from flowmatch.training.batches import BatchStream, CoupledBatches, StreamLoader, step_generator
from flowmatch.training.ema import EMA, ema_decay_from_halflife
from flowmatch.training.loop import Learner, NonFiniteLossError, UpdateRule
from flowmatch.training.lr import LRSchedule, lr_at
from flowmatch.training.objectives import FlowMatchingLoss
from flowmatch.training.trainer import Trainer, TrainResult

__all__ = [
    "BatchStream",
    "CheckpointError",
    "CoupledBatches",
    "EMA",
    "FlowMatchingLoss",
    "Learner",
    "LRSchedule",
    "NonFiniteLossError",
    "StreamLoader",
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
    "step_generator",
    "UpdateRule",
]
