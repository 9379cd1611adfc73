"""Small training configs and helpers shared by the training, coupling and distillation tests.

Importable from any test module: pytest puts ``tests/`` (the folder of the root conftest.py) on
``sys.path``.
"""

import os
import signal

import torch

from flowmatch.config import config_from_dict
from flowmatch.training import Trainer


def toy_cfg(tmp_path, **train):
    t = {"steps": 12, "batch_size": 32, "lr": 1e-3, "warmup_steps": 3, "log_every": 2,
         "sample_every": 6, "save_every": 4}
    t.update(train)
    return config_from_dict({
        "name": "toy", "seed": 3, "out_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"kind": "toy2d", "name": "moons", "n": 500},
        "model": {"arch": "mlp", "hidden": 32, "depth": 2},
        "train": t,
        "sample": {"method": "euler", "steps": 4, "n": 64},
    })


def digits_cfg(tmp_path, **train):
    t = {"steps": 6, "batch_size": 8, "grad_accum": 2, "lr": 2e-3, "log_every": 1,
         "sample_every": 0, "save_every": 2, "label_dropout": 0.2,
         "time_sampler": {"name": "logit_normal", "mean": 0.0, "std": 1.0, "shift": 2.0}}
    t.update(train)
    return config_from_dict({
        "name": "dig", "seed": 1, "out_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"kind": "digits", "image_size": 8, "split": "train", "hflip": True},
        "model": {"arch": "unet", "class_cond": True, "base_channels": 8, "channel_mults": [1, 2],
                  "num_res_blocks": 1, "attn_levels": [1], "num_heads": 2, "dropout": 0.1},
        "train": t,
        "sample": {"method": "euler", "steps": 2, "n": 10},
    })


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])



class _InterruptAt(Trainer):
    """Sends this process a real SIGINT right after optimizer step ``at`` (``_train_step(source)``
    is the Trainer's one optimizer step)."""

    at = 0

    def _train_step(self, source):
        out = super()._train_step(source)
        if self.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return out
