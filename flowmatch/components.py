"""The pieces a config names, built: the network and the latent-decoding facts of a data set.

Above the registries (models, data, the flow math, the autoencoder), below the run object, the
training loop and evaluation: everything that turns a :class:`~flowmatch.config.Config` into
objects goes through here, so each rule (e.g. "an unconditional model gets 0 classes") is written
once.
"""

from __future__ import annotations

import torch
from torch import nn

from flowmatch.config import Config, ConfigError
from flowmatch.models import MODEL_REGISTRY, build_model

__all__ = ["build_model_from_config", "latent_info", "load_autoencoder_for"]


def build_model_from_config(cfg: Config, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network a config describes, for data of ``data_shape`` with ``num_classes`` labels."""
    if cfg.model.class_cond and num_classes < 1:
        raise ConfigError("model.class_cond: the data set has no labels (num_classes is 0)")
    cfg_cls, _ = MODEL_REGISTRY[cfg.model.arch]
    arch_cfg = cfg_cls(**cfg.model.params)
    return build_model(cfg.model.arch, arch_cfg, tuple(data_shape),
                       num_classes if cfg.model.class_cond else 0)


def latent_info(dataset) -> dict | None:
    """What decoding a latent data set's samples needs: the VAE and the normalisation (or None)."""
    if getattr(dataset, "kind", "") == "pairs":  # a teacher's pairs: the teacher's latent space
        return dataset.latent
    if getattr(dataset, "kind", "") != "latent":
        return None
    return {"vae": dataset.vae_source, "normalization": dataset.normalization.to_dict(),
            "image_size": int(dataset.image_size)}


def load_autoencoder_for(latent: dict, device: str | torch.device = "cpu", vae: str | None = None):
    """The frozen VAE that decodes a latent model's samples, with the normalisation it was trained
    with (recorded in the checkpoint — never a different one). ``vae`` overrides where the VAE is
    loaded from (e.g. the folder moved), not how latents are scaled."""
    from flowmatch.autoencoder import Autoencoder, LatentNormalization

    norm = LatentNormalization.from_dict(latent["normalization"])
    return Autoencoder.load(vae or latent["vae"], normalization=norm, device=device)
