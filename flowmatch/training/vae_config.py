"""The schemas of VAE training: :class:`VAETrainConfig` (``flowmatch train-vae``) and
:class:`VAEFinetuneConfig` (``flowmatch finetune-vae``, a special case that
:meth:`VAEFinetuneConfig.to_train_config` turns into a :class:`VAETrainConfig`).

Both are flat YAML read by :func:`flowmatch.config.load_dataclass` (an unknown key or a wrong type
names the dotted key); impossible values are refused in ``__post_init__``, before any work. The
``data`` section of a :class:`VAETrainConfig` is the flow config's own :class:`DataConfig`
(``kind: digits | folder`` and that data set's arguments), checked by the data registry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from flowmatch.config import ConfigError, DataConfig
from flowmatch.data import DATASET_KINDS

__all__ = ["IMAGE_KINDS", "VAEFinetuneConfig", "VAETrainConfig", "downsampling_factor"]

IMAGE_KINDS = ("digits", "folder")  # the data kinds a VAE trains on (pixel images)
# "package.module:factory", an importable zero-argument factory of a perceptual network
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def downsampling_factor(block_out_channels) -> int:
    """``f = 2 ** (len(block_out_channels) - 1)``: an AutoencoderKL halves the resolution between
    consecutive blocks, so ``(C, S, S)`` images have ``(latent_channels, S / f, S / f)`` latents."""
    return 2 ** (len(block_out_channels) - 1)


def _check_loss_and_run(cfg) -> None:
    """The checks both schemas share: optimisation, loss weights, run settings."""
    _need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    _need(cfg.steps >= 1, "steps", "must be >= 1")
    _need(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", "must be > 0")
    _need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    _need(cfg.recon_loss in ("l1", "mse"), "recon_loss", "must be l1 or mse")
    _need(cfg.kl_weight >= 0, "kl_weight", "must be >= 0")
    _need(cfg.perceptual_weight >= 0, "perceptual_weight", "must be >= 0")
    _need(0.0 <= cfg.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
    _need(cfg.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
    _need(cfg.sample_every >= 0, "sample_every", "must be >= 0 (0 disables)")
    _need(cfg.save_every >= 0, "save_every", "must be >= 0")
    _need(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    _need(cfg.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class VAETrainConfig:
    """Schema of ``flowmatch train-vae``: a diffusers ``AutoencoderKL`` trained from scratch (``vae:
    ""``, built from the architecture fields) or from a pretrained one (``vae``: Hub id / folder)."""

    vae: str = ""  # Hub id or local folder to start from; "" = build from the fields below
    vae_subfolder: str = ""  # e.g. "vae" for a VAE inside a whole pipeline repository
    # -- architecture (used when vae is ""): a diffusers AutoencoderKL with plain conv blocks
    in_channels: int = 3  # image channels (3 RGB, 1 grey); the decoder outputs as many
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # downsampling 2**(len-1)
    layers_per_block: int = 1  # resnet layers per encoder block (the decoder has one more)
    latent_channels: int = 4
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block width
    # -- data: kind digits | folder and that data set's arguments (as in a flow config's data)
    data: DataConfig = field(default_factory=DataConfig)
    # -- loss: recon + kl_weight * KL + perceptual_weight * P(x_rec, x)
    recon_loss: str = "l1"  # l1 | mse
    kl_weight: float = 1e-6
    perceptual: str = "none"  # lpips | none | "package.module:factory" (zero-argument, an nn.Module)
    perceptual_weight: float = 0.1  # 0 (or perceptual: none) runs without a perceptual term
    train_encoder: bool = True  # false (pretrained starts only): decoder only, the latent space stays
    # -- optimisation (AdamW)
    steps: int = 10000  # optimizer steps
    batch_size: int = 16  # per process; the global batch is batch_size x processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up steps
    lr_schedule: str = "constant"  # constant | cosine (down to 0 at `steps`)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # per step; 0 = no EMA (the saved VAE is then the trained weights)
    seed: int = 0  # initial weights, data order, flips and posterior noise
    # -- run
    out_dir: str = "runs/vae"
    sample_every: int = 500  # steps between reconstruction grids; 0 disables
    save_every: int = 1000  # steps between writes of checkpoints/latest.pt; 0 = only at the end
    log_every: int = 10  # steps averaged into one metrics.jsonl line
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # DataLoader processes decoding images

    def __post_init__(self) -> None:
        if not self.vae:
            self._check_architecture()
        _need(self.data.kind in IMAGE_KINDS, "data.kind",
              f"a VAE trains on images: one of {', '.join(IMAGE_KINDS)}, got {self.data.kind!r}")
        self.data.params = DATASET_KINDS.resolve(self.data.kind, self.data.params)
        _check_loss_and_run(self)
        _need(self.perceptual in ("lpips", "none") or _FACTORY.fullmatch(self.perceptual) is not None,
              "perceptual", f"must be lpips, none or 'package.module:factory', got {self.perceptual!r}")
        _need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "must be constant or cosine")
        _need(self.log_every >= 1, "log_every", "must be >= 1")
        _need(bool(self.vae) or self.train_encoder, "train_encoder",
              "false keeps the encoder as it is: that needs a pretrained vae (a new one's is random)")

    def _check_architecture(self) -> None:
        _need(self.in_channels in (1, 3), "in_channels", "must be 1 (grey) or 3 (RGB)")
        _need(len(self.block_out_channels) >= 1, "block_out_channels", "needs at least one width")
        _need(all(c >= 1 for c in self.block_out_channels), "block_out_channels", "widths must be >= 1")
        _need(self.layers_per_block >= 1, "layers_per_block", "must be >= 1")
        _need(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        _need(self.norm_num_groups >= 1, "norm_num_groups", "must be >= 1")
        for i, width in enumerate(self.block_out_channels):
            _need(width % self.norm_num_groups == 0, "norm_num_groups",
                  f"{self.norm_num_groups} does not divide block_out_channels[{i}] = {width} "
                  "(GroupNorm splits every block's channels into that many groups)")

    @property
    def from_scratch(self) -> bool:
        return not self.vae

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual != "none" and self.perceptual_weight > 0


@dataclass
class VAEFinetuneConfig:
    """Schema of ``flowmatch finetune-vae``: a pretrained VAE's decoder fine-tuned on an image
    folder at a constant learning rate (:meth:`to_train_config` gives the equivalent train-vae run)."""

    vae: str = "stabilityai/sd-vae-ft-ema"  # Hub id or local folder of the AutoencoderKL to start from
    vae_subfolder: str = ""  # e.g. "vae" for a VAE inside a whole pipeline repository
    images: str = ""  # folder of training images (required)
    image_size: int = 256  # training crops are image_size squares (centre crop after resize)
    batch_size: int = 4
    steps: int = 1000  # optimizer steps
    lr: float = 1e-5  # AdamW, constant
    weight_decay: float = 0.0
    recon_loss: str = "l1"  # l1 | mse
    kl_weight: float = 1e-6
    perceptual: str = "lpips"  # lpips | none
    perceptual_weight: float = 0.1  # 0 (or perceptual: none) runs without lpips
    train_encoder: bool = False  # False: decoder only, the latent space stays as it is
    ema_decay: float = 0.999  # per step; the saved VAE is the EMA copy
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    out_dir: str = "runs/vae"
    sample_every: int = 200  # steps between reconstruction grids; 0 disables
    save_every: int = 200  # steps between writes of checkpoints/latest.pt; 0 = only at the end
    device: str = "auto"  # auto | cpu | cuda
    hflip: bool = True  # random horizontal flips, drawn from the step's generator
    num_workers: int = 0  # DataLoader processes decoding images

    def __post_init__(self) -> None:
        _need(bool(self.vae), "vae", "required: a Hub id or a local VAE folder")
        _need(bool(self.images), "images", "required: the folder of training images")
        _need(self.image_size >= 8, "image_size", "must be >= 8")
        _check_loss_and_run(self)
        _need(self.perceptual in ("lpips", "none"), "perceptual", "must be lpips or none")

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual != "none" and self.perceptual_weight > 0

    def to_train_config(self) -> VAETrainConfig:
        """The same run as a :class:`VAETrainConfig`: RGB folder images centre-cropped to
        ``image_size``, a constant learning rate without warm-up, one metrics line per step."""
        data = DataConfig(kind="folder", hflip=self.hflip, params={
            "root": self.images, "image_size": self.image_size, "channels": 3, "center_crop": True})
        same = ("vae", "vae_subfolder", "batch_size", "steps", "lr", "weight_decay", "recon_loss",
                "kl_weight", "perceptual", "perceptual_weight", "train_encoder", "ema_decay",
                "grad_clip", "seed", "out_dir", "sample_every", "save_every", "device", "num_workers")
        return VAETrainConfig(**{k: getattr(self, k) for k in same}, data=data, warmup_steps=0,
                              lr_schedule="constant", log_every=1)
