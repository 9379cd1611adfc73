"""Fine-tuning an AutoencoderKL on your images, and measuring its reconstructions.

Stable Diffusion's ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` were made by fine-tuning only the decoder
of the original VAE: the latent space (the encoder) stays fixed, so latent stores and flow models
built on it stay valid, while the decoder learns to render the target domain's details. That is the
default here (``train_encoder: false``). One step on a batch ``x`` in ``[-1, 1]``::

    (m, s) = encoder(x),  z = m + s * eps,  eps ~ N(0, I)      (eps from the step's seeded generator)
    x_rec  = decoder(z)
    loss   = recon(x_rec, x)                                    l1 or mse, mean over pixels
           + kl_weight * KL(N(m, s^2) || N(0, I))               0.5 sum(m^2 + s^2 - 1 - log s^2)
                                                                over (C, h, w), mean over the batch
           + perceptual_weight * P(x_rec, x)                    LPIPS by default, mean over the batch

The perceptual network ``P`` is frozen, but the loss is differentiated *through* it to ``x_rec``
(a perceptual term computed under ``no_grad`` would silently train nothing). Training runs in
float32 on one process.

The loop is built from the flow trainer's pieces (:mod:`flowmatch.training.batches`,
:mod:`flowmatch.training.loop`), so reproducibility follows it: the batch order is
:class:`BatchStream`'s (a pure function of the step), step ``k``'s flips and posterior noise come
from ``step_generator(seed, k)``, and a run resumed from ``checkpoints/latest.pt`` continues exactly
as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from flowmatch import distributed
from flowmatch.atomic import atomic_open
from flowmatch.autoencoder import Autoencoder, load_vae
from flowmatch.checkpoint import CheckpointError
from flowmatch.config import ConfigError
from flowmatch.data.imagefolder import ImageFolder
from flowmatch.imageio import save_image_grid
from flowmatch.rundir import lock_run_dir, remove_stale_temps
from flowmatch.training.batches import BatchStream, StreamLoader, step_generator
from flowmatch.training.ema import EMA
from flowmatch.training.loop import (
    Checkpoints,
    Learner,
    MetricsLog,
    StopOnInterrupt,
    UpdateRule,
    progress_bar,
)
from flowmatch.training.lr import LRSchedule

__all__ = ["VAEFinetuneConfig", "finetune_loss", "finetune_vae", "psnr", "reconstruct"]

_GRID_IMAGES = 8  # images in the reconstruction grids written during training


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class VAEFinetuneConfig:
    """Schema of a VAE fine-tuning run (``flowmatch.config.load_dataclass`` reads it from YAML)."""

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
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        need(bool(self.vae), "vae", "required: a Hub id or a local VAE folder")
        need(bool(self.images), "images", "required: the folder of training images")
        need(self.image_size >= 8, "image_size", "must be >= 8")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.recon_loss in ("l1", "mse"), "recon_loss", "must be l1 or mse")
        need(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        need(self.perceptual in ("lpips", "none"), "perceptual", "must be lpips or none")
        need(self.perceptual_weight >= 0, "perceptual_weight", "must be >= 0")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
        need(self.sample_every >= 0, "sample_every", "must be >= 0 (0 disables)")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual != "none" and self.perceptual_weight > 0


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def _lpips(device: torch.device) -> nn.Module:
    """LPIPS (VGG), imported only when asked for."""
    try:
        import lpips
    except ImportError as error:
        raise ImportError(
            "perceptual: lpips needs the optional `lpips` package (pip install lpips; it needs "
            "torchvision and downloads its network weights on first use). Install it, or set "
            "perceptual: none (or perceptual_weight: 0) to fine-tune without a perceptual loss"
        ) from error
    try:
        net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # weights download / torchvision failures of every kind
        raise RuntimeError(
            f"could not build LPIPS (its weights could not be loaded: {error}); run once with "
            "network access, or set perceptual: none"
        ) from error
    return net.to(device)


def finetune_loss(
    vae: nn.Module,
    x: torch.Tensor,
    eps: torch.Tensor,
    cfg: VAEFinetuneConfig,
    perceptual_net: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fine-tuning loss of one batch (formula in the module docstring).

    Args:
        vae: the trainable ``AutoencoderKL``.
        x: ``(B, 3, H, W)`` images in ``[-1, 1]``.
        eps: ``(B, C, H / f, W / f)`` standard normal noise of the posterior sample.
        cfg: loss choices and weights (``recon_loss``, ``kl_weight``, ``perceptual_weight``,
            ``train_encoder``).
        perceptual_net: ``P(x_rec, x)`` -> per-sample or scalar distances; None skips the term.

    Returns:
        ``(loss, terms)``: the weighted total and the unweighted terms ``recon``, ``kl``,
        ``perceptual`` (0 without a net), all scalars that keep their autograd graph, plus
        ``x_rec`` ``(B, 3, H, W)``.
    """
    # A frozen encoder needs no graph; a trained one gets its gradient through z and the KL.
    with torch.set_grad_enabled(cfg.train_encoder and torch.is_grad_enabled()):
        posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * eps  # (B, C, h, w), reparameterised
    x_rec = vae.decode(z).sample  # (B, 3, H, W)
    if cfg.recon_loss == "l1":
        recon = (x_rec - x).abs().mean()
    else:
        recon = (x_rec - x).pow(2).mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
    if perceptual_net is not None:
        perceptual = perceptual_net(x_rec, x).mean()  # graph kept: gradient flows to x_rec
    else:
        perceptual = torch.zeros((), device=x.device)
    loss = recon + cfg.kl_weight * kl + cfg.perceptual_weight * perceptual
    return loss, {"recon": recon, "kl": kl, "perceptual": perceptual, "x_rec": x_rec}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    return distributed.resolve_device(name)


def _trainable_parameters(vae: nn.Module, train_encoder: bool) -> list[nn.Parameter]:
    """Decoder (+ post-quant conv), and encoder (+ quant conv) when ``train_encoder``."""
    vae.requires_grad_(False)
    parts = [vae.decoder, getattr(vae, "post_quant_conv", None)]
    if train_encoder:
        parts += [vae.encoder, getattr(vae, "quant_conv", None)]
    params = []
    for part in parts:
        if part is not None:
            part.requires_grad_(True)
            params += list(part.parameters())
    return params


def _learner(cfg: VAEFinetuneConfig, device: torch.device, checkpoint: Path) -> tuple[Learner, tuple]:
    """The VAE (trainable parts chosen), its EMA copy and AdamW at a constant lr; the latent shape."""
    vae = load_vae(cfg.vae, subfolder=cfg.vae_subfolder or None, device=device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.image_size % factor:
        raise ConfigError(f"image_size: {cfg.image_size} is not a multiple of the VAE's "
                          f"downsampling factor {factor}")
    latent_shape = (int(vae.config.latent_channels), cfg.image_size // factor, cfg.image_size // factor)
    params = _trainable_parameters(vae, cfg.train_encoder)
    ema = EMA(vae)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rule = UpdateRule(LRSchedule(cfg.lr, cfg.steps, schedule="constant"), grad_clip=cfg.grad_clip,
                      ema_decay=cfg.ema_decay)
    return Learner(vae, optimizer, ema, rule, model_key="vae", checkpoint=checkpoint), latent_shape


def _perceptual(cfg: VAEFinetuneConfig, net: nn.Module | None, device: torch.device) -> nn.Module | None:
    """The frozen perceptual network: ``net`` if given, else LPIPS; None when the term is off."""
    if not cfg.uses_perceptual:
        return None
    net = net if net is not None else _lpips(device)
    return net.to(device).eval().requires_grad_(False)


def _resume(learner: Learner, checkpoints: Checkpoints, cfg: VAEFinetuneConfig, device) -> None:
    """Continue from checkpoints/latest.pt, if there is one and it was made with this VAE setup."""
    state = checkpoints.read(device)
    if state is None:
        return
    saved = state.get("config", {})
    for key in ("vae", "vae_subfolder", "train_encoder"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"{checkpoints.latest} was written with {key}={saved.get(key)!r}, this run has "
                f"{getattr(cfg, key)!r}; use another out_dir or delete the checkpoint")
    learner.load_state_dict(state)
    print(f"resumed from {checkpoints.latest} at step {learner.step}", flush=True)


class _StepLoss:
    """``loss_of(k)`` for the Learner: batch ``k`` of the image stream, its flips and posterior noise
    from ``step_generator(seed, k)``; the last step's loss terms in ``terms``."""

    def __init__(self, cfg: VAEFinetuneConfig, vae: nn.Module, batches: StreamLoader,
                 latent_shape: tuple, perceptual_net: nn.Module | None):
        self.cfg, self.vae, self.batches = cfg, vae, batches
        self.latent_shape, self.perceptual_net = latent_shape, perceptual_net
        self.device = next(vae.parameters()).device
        self.terms: dict[str, float] = {}

    def __call__(self, k: int) -> torch.Tensor:
        device = self.device
        x = self.batches(k)[0].to(device)  # (B, 3, S, S); labels dropped
        g = step_generator(self.cfg.seed, k)
        flip = torch.rand(len(x), generator=g) < 0.5
        eps = torch.randn((len(x), *self.latent_shape), generator=g).to(device)
        if self.cfg.hflip:
            x = torch.where(flip.view(-1, 1, 1, 1).to(device), x.flip(-1), x)
        loss, terms = finetune_loss(self.vae, x, eps, self.cfg, self.perceptual_net)
        self.terms = {name: float(v.detach()) for name, v in terms.items() if name != "x_rec"}
        return loss


@torch.no_grad()
def _reconstruction_grid(vae: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """Originals in the top row, reconstructions (posterior mean, no noise) below."""
    x_rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return save_image_grid(torch.cat([x, x_rec]).cpu(), path, nrow=len(x))


def finetune_vae(
    cfg: VAEFinetuneConfig, perceptual_net: nn.Module | None = None, progress: bool = True
) -> Path:
    """Fine-tune ``cfg.vae`` on ``cfg.images``; resume from ``out_dir/checkpoints/latest.pt``.

    Writes into ``cfg.out_dir``: ``config.yaml``; ``checkpoints/latest.pt`` (step, config, weights,
    EMA weights, optimizer; atomic) every ``save_every`` steps and at the end;
    ``samples/step_XXXXXXX.png`` reconstruction grids from the EMA weights; ``metrics.jsonl``
    (one line per step); and at the end ``vae/``, the EMA VAE in diffusers format, which
    ``Autoencoder.load(out_dir / "vae")`` reads.

    Args:
        cfg: the run's configuration.
        perceptual_net: used instead of LPIPS when given: any module mapping ``(x_rec, x)`` in
            ``[-1, 1]`` to per-sample or scalar distances. It is moved to the device and frozen
            (eval mode, ``requires_grad=False``) in place. Needs ``perceptual != "none"``.
        progress: show the progress (a bar on a terminal, a line per interval elsewhere).

    Ctrl-C finishes the current step, writes the checkpoint and raises ``KeyboardInterrupt``;
    running again resumes.

    Returns:
        The folder of the saved EMA VAE (``out_dir/vae``).
    """
    if perceptual_net is not None and cfg.perceptual == "none":
        raise ConfigError("perceptual: is 'none', but a perceptual network was passed; set "
                          "perceptual: lpips (the network replaces LPIPS) or pass none")
    device = _device(cfg.device)
    with lock_run_dir(cfg.out_dir, "finetune-vae"):  # one writer at a time
        return _finetune(cfg, perceptual_net, progress, device)


def _finetune(cfg: VAEFinetuneConfig, perceptual_net: nn.Module | None, progress: bool,
              device: torch.device) -> Path:
    """The body of :func:`finetune_vae`, run while holding the output folder's lock."""
    out = Path(cfg.out_dir)
    checkpoints = Checkpoints(out / "checkpoints", require=("step", "vae", "ema", "optimizer"))
    remove_stale_temps(out)
    remove_stale_temps(checkpoints.folder)
    with atomic_open(out / "config.yaml", "w") as f:
        f.write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    learner, latent_shape = _learner(cfg, device, checkpoints.latest)
    perceptual_net = _perceptual(cfg, perceptual_net, device)
    dataset = ImageFolder(cfg.images, cfg.image_size, channels=3, center_crop=True)
    grid_x = torch.stack([dataset[i][0] for i in range(min(_GRID_IMAGES, len(dataset)))]).to(device)
    _resume(learner, checkpoints, cfg, device)
    metrics = MetricsLog(out / "metrics.jsonl")
    metrics.resume(learner.step)
    batches = StreamLoader(dataset, BatchStream(len(dataset), cfg.batch_size, cfg.seed), learner.step,
                           cfg.num_workers)
    step_loss = _StepLoss(cfg, learner.model, batches, latent_shape, perceptual_net)

    def save() -> None:
        checkpoints.write({"step": learner.step, "config": dataclasses.asdict(cfg), **learner.state_dict()})

    learner.model.train()
    with progress_bar(progress, cfg.steps, learner.step, "finetune vae") as bar, \
            StopOnInterrupt() as interrupt:
        while learner.step < cfg.steps:
            loss, grad_norm = learner.train_step(step_loss)
            step = learner.step
            metrics.append({"step": step, "loss": loss, "grad_norm": grad_norm, "time": time.time(),
                            **step_loss.terms})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", recon=f"{step_loss.terms['recon']:.4f}")
            if cfg.sample_every and step % cfg.sample_every == 0:
                _reconstruction_grid(learner.ema.model, grid_x, out / "samples" / f"step_{step:07d}.png")
            if cfg.save_every and step % cfg.save_every == 0:
                save()
            if interrupt.requested and step < cfg.steps:
                save()
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint written to "
                                        f"{checkpoints.latest}; run again to resume")
    save()
    vae_dir = out / "vae"
    learner.ema.model.save_pretrained(vae_dir)
    print(f"done: {learner.step} steps; fine-tuned (EMA) VAE in {vae_dir}", flush=True)
    return vae_dir


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in ``[-1, 1]``, computed on ``[0, 1]``.

    ``PSNR = 10 log10(1 / MSE)`` with the MSE over ``(C, H, W)`` of ``(x + 1) / 2`` against
    ``(y + 1) / 2``; an MSE below 1e-10 counts as 1e-10 (100 dB), so identical images stay finite.
    Shapes ``(B, C, H, W)`` -> ``(B,)``.
    """
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (y.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def reconstruct(
    autoencoder: Autoencoder,
    images_dir: str | Path,
    out_png: str | Path,
    *,
    n: int = 16,
    image_size: int = 256,
    batch_size: int = 8,
) -> dict:
    """Encode and decode the first ``n`` images of a folder; write a comparison grid; score it.

    Images are resized and centre-cropped to ``image_size``, encoded to the posterior mean and
    decoded. The PNG has the originals in the top row and the reconstructions below.

    Returns:
        ``{"psnr": mean PSNR in dB over the images (see :func:`psnr`), "n": images used}``
        (fewer than ``n`` when the folder has fewer).
    """
    dataset = ImageFolder(images_dir, image_size, channels=3, center_crop=True)
    n = min(n, len(dataset))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    originals, recons = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, n))])
        recons.append(autoencoder.decode(autoencoder.encode(x)).cpu())
        originals.append(x)
    x, x_rec = torch.cat(originals), torch.cat(recons)
    save_image_grid(torch.cat([x, x_rec]), out_png, nrow=n)
    return {"psnr": float(psnr(x_rec, x).mean()), "n": n}
