"""Training an AutoencoderKL -- from scratch or from a pretrained one -- and measuring its
reconstructions.

:func:`train_vae` is the one loop (``flowmatch train-vae``); :func:`finetune_vae` (``flowmatch
finetune-vae``) is its special case that starts from a pretrained VAE and, by default, trains the
decoder only: Stable Diffusion's ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` were made that way, so the
latent space (the encoder) stays fixed and latent stores and flow models built on it stay valid.
One step on a batch ``x`` in ``[-1, 1]``::

    (m, s) = encoder(x),  z = m + s * eps,  eps ~ N(0, I)      (eps from the step's seeded generator)
    x_rec  = decoder(z)
    loss   = recon(x_rec, x)                                    l1 or mse, mean over pixels
           + kl_weight * KL(N(m, s^2) || N(0, I))               0.5 sum(m^2 + s^2 - 1 - log s^2)
                                                                over (C, h, w), mean over the batch
           + perceptual_weight * P(x_rec, x)                    LPIPS or a pluggable network,
                                                                mean over the batch

The perceptual network ``P`` is frozen, but the loss is differentiated *through* it to ``x_rec``
(a perceptual term computed under ``no_grad`` would silently train nothing). Training runs in
float32.

The loop is built from the flow trainer's pieces (:mod:`flowmatch.training.batches`,
:mod:`flowmatch.training.loop`), so reproducibility and multi-process training follow it: the
batch order is :class:`BatchStream`'s (a pure function of the step; under torchrun process ``r``
takes the ``r``-th slice of the global batch), step ``k``'s flips and posterior noise are drawn for
the global batch from ``step_generator(seed, k)`` and sliced the same way, the gradients are averaged
by ``DistributedDataParallel``, and a run resumed from ``checkpoints/latest.pt`` continues exactly as
if it had never stopped. Only rank 0 writes files.

A VAE trained from scratch gets ``scaling_factor = 1 / std`` of its posterior means over (up to
2048) training images written into its saved config -- how Stable Diffusion arrived at 0.18215 --
so the default ``"scaling"`` latent normalisation (:mod:`flowmatch.autoencoder`) gives latents of
unit variance. A pretrained start keeps its factor.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from flowmatch import distributed
from flowmatch.atomic import atomic_open
from flowmatch.autoencoder import Autoencoder, load_vae
from flowmatch.checkpoint import CheckpointError
from flowmatch.config import ConfigError, config_to_dict
from flowmatch.data import build_dataset
from flowmatch.data.imagefolder import ImageFolder
from flowmatch.imageio import save_image_grid
from flowmatch.plots import save_line_plot
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
    stop_status,
)
from flowmatch.training.lr import LRSchedule
from flowmatch.training.vae_config import (
    VAEFinetuneConfig,
    VAETrainConfig,
    downsampling_factor,
)

__all__ = [
    "Reconstruction",
    "VAEFinetuneConfig",
    "VAETrainConfig",
    "VAETrainingStopped",
    "build_vae",
    "finetune_loss",
    "finetune_vae",
    "measure_scaling_factor",
    "perceptual_network",
    "psnr",
    "reconstruct",
    "train_vae",
    "vae_loss",
]

_GRID_IMAGES = 8  # images in the reconstruction grids written during training
_SCALING_IMAGES = 2048  # training images whose posterior means set a new VAE's scaling_factor
_TERMS = ("recon", "kl", "perceptual")  # the unweighted loss terms logged beside the loss
# What a resumed run must share with its checkpoint: the network and which of its parts train.
_RESUME_KEYS = ("vae", "vae_subfolder", "train_encoder")
_ARCHITECTURE_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "latent_channels",
                      "norm_num_groups")


class VAETrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped :func:`train_vae` after a step, with its checkpoint written;
    ``status`` is ``"interrupted"`` (SIGINT) or ``"terminated"`` (SIGTERM). Running again resumes."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


class _GreyAsRGB(nn.Module):
    """A perceptual network for RGB images applied to grey ones (the channel repeated three times)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x_rec.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1))


def _lpips(device: torch.device) -> nn.Module:
    """LPIPS (VGG), imported only when asked for."""
    try:
        import lpips
    except ImportError as error:
        raise ImportError(
            "perceptual: lpips needs the optional `lpips` package (pip install lpips; it needs "
            "torchvision and downloads its network weights on first use). Install it, or set "
            "perceptual: none (or perceptual_weight: 0) to train without a perceptual loss"
        ) from error
    try:
        net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # weights download / torchvision failures of every kind
        raise RuntimeError(
            f"could not build LPIPS (its weights could not be loaded: {error}); run once with "
            "network access, or set perceptual: none"
        ) from error
    return net.to(device)


def _from_factory(spec: str) -> nn.Module:
    """The network ``package.module:factory()`` builds (the config's pluggable perceptual net)."""
    module_name, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"perceptual: cannot import {spec!r} ({error})") from None
    net = factory()
    if not isinstance(net, nn.Module):
        raise ConfigError(f"perceptual: {spec}() returned a {type(net).__name__}, not a torch nn.Module")
    return net


def perceptual_network(cfg: VAETrainConfig, net: nn.Module | None, device: torch.device,
                       channels: int = 3) -> nn.Module | None:
    """The frozen perceptual network ``P(x_rec, x)``: ``net`` if given, else what ``cfg.perceptual``
    names (LPIPS, or the module a ``"package.module:factory"`` builds); None when the term is off.
    LPIPS reads RGB: grey (``channels`` 1) images are repeated to three channels for it."""
    if not cfg.uses_perceptual:
        return None
    if net is None and cfg.perceptual == "lpips":
        net = _lpips(device)
        net = _GreyAsRGB(net) if channels == 1 else net
    elif net is None:
        net = _from_factory(cfg.perceptual)
    return net.to(device).eval().requires_grad_(False)


class Reconstruction(nn.Module):
    """``(x, eps) -> (x_rec, mean, logvar)``: encode, draw ``z = mean + std * eps``, decode -- the
    VAE's training pass as one ``forward``, so that ``DistributedDataParallel`` can wrap it (DDP
    synchronises gradients only of passes that go through its ``forward``).

    With ``train_encoder`` False the encoder runs without autograd: nothing reaches it, and the KL
    term then carries no gradient."""

    def __init__(self, vae: nn.Module, train_encoder: bool = True):
        super().__init__()
        self.vae, self.train_encoder = vae, train_encoder

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps  # (B, C, h, w), reparameterised
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar  # (B, c, H, W), 2 x (B, C, h, w)


def vae_loss(
    reconstruction: nn.Module,
    x: torch.Tensor,
    eps: torch.Tensor,
    cfg: VAETrainConfig | VAEFinetuneConfig,
    perceptual_net: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch (formula in the module docstring).

    Args:
        reconstruction: a :class:`Reconstruction` (or DistributedDataParallel around one).
        x: ``(B, c, H, W)`` images in ``[-1, 1]``.
        eps: ``(B, C, H / f, W / f)`` standard normal noise of the posterior sample.
        cfg: loss choices and weights (``recon_loss``, ``kl_weight``, ``perceptual_weight``).
        perceptual_net: ``P(x_rec, x)`` -> per-sample or scalar distances; None skips the term.

    Returns:
        ``(loss, terms)``: the weighted total and the unweighted terms ``recon``, ``kl``,
        ``perceptual`` (0 without a net), all scalars that keep their autograd graph, plus
        ``x_rec`` ``(B, c, H, W)``.
    """
    x_rec, mean, logvar = reconstruction(x, eps)
    if cfg.recon_loss == "l1":
        recon = (x_rec - x).abs().mean()
    else:
        recon = (x_rec - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    if perceptual_net is not None:
        perceptual = perceptual_net(x_rec, x).mean()  # graph kept: gradient flows to x_rec
    else:
        perceptual = torch.zeros((), device=x.device)
    loss = recon + cfg.kl_weight * kl + cfg.perceptual_weight * perceptual
    return loss, {"recon": recon, "kl": kl, "perceptual": perceptual, "x_rec": x_rec}


def finetune_loss(vae: nn.Module, x: torch.Tensor, eps: torch.Tensor, cfg: VAETrainConfig | VAEFinetuneConfig,
                  perceptual_net: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`vae_loss` of the ``AutoencoderKL`` ``vae`` itself (its encoder trained only when
    ``cfg.train_encoder``)."""
    return vae_loss(Reconstruction(vae, cfg.train_encoder), x, eps, cfg, perceptual_net)


# ----------------------------------------------------------------------------------------------
# The VAE and its data
# ----------------------------------------------------------------------------------------------


def build_vae(cfg: VAETrainConfig, image_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The ``AutoencoderKL`` a run starts from: ``cfg.vae`` loaded, or for ``vae: ""`` a new one
    built from the architecture fields (plain conv blocks, ``sample_size=image_size``), its initial
    weights seeded by ``cfg.seed``."""
    if cfg.vae:
        return load_vae(cfg.vae, subfolder=cfg.vae_subfolder or None, device=device)
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError("train-vae needs diffusers: pip install 'flowmatch[vae]'") from error
    n = len(cfg.block_out_channels)
    torch.manual_seed(cfg.seed)  # initial weights
    vae = AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        sample_size=image_size,
    )
    return vae.to(device)


def _image_data(cfg: VAETrainConfig):
    """The training images, with their shape checked against ``data.shape``: ``(C, S, S)``."""
    dataset = build_dataset(cfg.data.kind, **cfg.data.params)
    shape = tuple(dataset.data_shape)
    if cfg.data.shape and tuple(cfg.data.shape) != shape:
        raise ConfigError(f"data.shape: the config expects items of shape {tuple(cfg.data.shape)}, "
                          f"the data set gives {shape}")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"data: a VAE trains on square images (C, S, S), the data set gives {shape}")
    return dataset


def _check_fit(cfg: VAETrainConfig, vae: nn.Module, dataset) -> tuple[int, int, int]:
    """The latent shape of the data's images; a ConfigError when they do not fit the VAE."""
    channels, size = int(dataset[0][0].shape[0]), int(dataset.data_shape[-1])
    wants = int(vae.config.in_channels)
    if channels != wants:
        fix = (f"set in_channels: {channels}" if cfg.from_scratch else "use a VAE for such images")
        if cfg.data.kind == "folder":
            fix += f", or data.channels: {wants}"
        raise ConfigError(f"{'in_channels' if cfg.from_scratch else 'data'}: the images have "
                          f"{channels} channel(s), the VAE reads {wants}; {fix}")
    factor = downsampling_factor(vae.config.block_out_channels)
    if size % factor:
        raise ConfigError(f"data.image_size: {size} is not a multiple of the VAE's downsampling "
                          f"factor {factor} (2 ** (len(block_out_channels) - 1))")
    return (int(vae.config.latent_channels), size // factor, size // factor)


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


def _learner(cfg: VAETrainConfig, vae: nn.Module, dist: distributed.DistInfo, checkpoint: Path) -> Learner:
    """The VAE (trainable parts chosen), its EMA copy, AdamW with the schedule, and under torchrun
    DistributedDataParallel around its :class:`Reconstruction` pass."""
    params = _trainable_parameters(vae, cfg.train_encoder)
    ema = EMA(vae)
    model = Reconstruction(vae, cfg.train_encoder)
    if dist.distributed:
        device = next(vae.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rule = UpdateRule(LRSchedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr_schedule),
                      grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay)
    return Learner(vae, optimizer, ema, rule, ddp_model=model, model_key="vae", checkpoint=checkpoint)


@torch.no_grad()
def measure_scaling_factor(vae: nn.Module, dataset, n: int = _SCALING_IMAGES,
                           batch_size: int = 64) -> tuple[float, float]:
    """``(1 / std, std)``: ``std`` the standard deviation (``torch.std``, over every element) of
    the posterior means of the first ``min(n, len(dataset))`` images -- the ``scaling_factor`` that
    gives the ``"scaling"`` latent normalisation unit-variance latents."""
    device = next(vae.parameters()).device
    means = []
    for start in range(0, min(n, len(dataset)), batch_size):
        stop = min(start + batch_size, n, len(dataset))
        x = torch.stack([dataset[i][0] for i in range(start, stop)]).to(device)
        means.append(vae.encode(x).latent_dist.mean.float().cpu())
    std = float(torch.cat(means).std())
    return 1.0 / std, std


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class _StepLoss:
    """``loss_of(k)`` for the Learner: this process's rows of batch ``k`` of the image stream, their
    flips and posterior noise from ``step_generator(seed, k)`` (drawn for the global batch, then
    sliced like the data); the step's loss terms added to ``sums``."""

    def __init__(self, cfg: VAETrainConfig, model: nn.Module, batches: StreamLoader, stream: BatchStream,
                 latent_shape: tuple, perceptual_net: nn.Module | None):
        self.cfg, self.model, self.batches, self.stream = cfg, model, batches, stream
        self.latent_shape, self.perceptual_net = latent_shape, perceptual_net
        self.device = next(model.parameters()).device
        self.sums = torch.zeros(len(_TERMS))  # the unweighted terms, summed since the last log line

    def __call__(self, k: int) -> torch.Tensor:
        device, G = self.device, self.stream.global_batch
        x = self.batches(k)[0].to(device)  # (B, c, S, S); labels dropped
        g = step_generator(self.cfg.seed, k)
        flip = (torch.rand(G, generator=g) < 0.5)[self.stream.rows]
        eps = torch.randn((G, *self.latent_shape), generator=g)[self.stream.rows].to(device)
        if self.cfg.data.hflip:
            x = torch.where(flip.view(-1, 1, 1, 1).to(device), x.flip(-1), x)
        loss, terms = vae_loss(self.model, x, eps, self.cfg, self.perceptual_net)
        self.sums += torch.tensor([float(terms[name].detach()) for name in _TERMS])
        return loss


@torch.no_grad()
def _reconstruction_grid(vae: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """Originals in the top row, reconstructions (posterior mean, no noise) below."""
    x_rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return save_image_grid(torch.cat([x, x_rec]).cpu(), path, nrow=len(x))


class _VAERun:
    """One launch of :func:`train_vae`, holding the output folder's lock: set-up, resume, the loop."""

    def __init__(self, cfg: VAETrainConfig, perceptual_net: nn.Module | None, progress: bool,
                 dist: distributed.DistInfo, device: torch.device):
        self.cfg, self.dist, self.device, self.progress = cfg, dist, device, progress
        self.out = Path(cfg.out_dir)
        self.checkpoints = Checkpoints(self.out / "checkpoints", require=("step", "vae", "ema", "optimizer"))
        self.dataset = _image_data(cfg)
        vae = build_vae(cfg, int(self.dataset.data_shape[-1]), device)
        self.latent_shape = _check_fit(cfg, vae, self.dataset)
        self.perceptual = perceptual_network(cfg, perceptual_net, device, int(vae.config.in_channels))
        self.learner = _learner(cfg, vae, dist, self.checkpoints.latest)
        self.global_batch = cfg.batch_size * dist.world_size
        self.stream = BatchStream(len(self.dataset), self.global_batch, cfg.seed, dist.rank, dist.world_size)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        n_grid = min(_GRID_IMAGES, len(self.dataset))
        self.grid_x = torch.stack([self.dataset[i][0] for i in range(n_grid)]).to(device)

    def describe(self) -> str:
        vae, (c, h, w) = self.learner.model, self.latent_shape
        total = sum(p.numel() for p in vae.parameters())
        trained = sum(p.numel() for p in self.learner.params)
        size = self.dataset.data_shape
        start = f"from {self.cfg.vae}" if self.cfg.vae else "from scratch"
        return (f"AutoencoderKL {start}: {total:,} parameters ({total / 1e6:.2f}M), {trained:,} "
                f"trained; images {tuple(size)} -> latents ({c}, {h}, {w}), downsampling factor "
                f"{size[-1] // h}; {len(self.dataset)} images; global batch {self.global_batch} = "
                f"{self.cfg.batch_size} x {self.dist.world_size} process(es); device {self.device}")

    def state_dict(self) -> dict:
        return {"step": self.learner.step, "config": config_to_dict(self.cfg),
                **self.learner.state_dict(), "world_size": self.dist.world_size,
                "global_batch": self.global_batch}

    def save(self) -> None:
        if self.dist.is_main:
            self.checkpoints.write(self.state_dict())
        distributed.barrier()

    def resume(self) -> None:
        """Continue from checkpoints/latest.pt, if there is one and it holds this network."""
        state = self.checkpoints.read(self.device)
        if state is None:
            return
        saved, now = state.get("config", {}), config_to_dict(self.cfg)
        keys = _RESUME_KEYS + (_ARCHITECTURE_KEYS if self.cfg.from_scratch else ())
        for key in keys:
            if saved.get(key) != now[key]:
                raise CheckpointError(
                    f"{self.checkpoints.latest} was written with {key}={saved.get(key)!r}, this run "
                    f"has {now[key]!r}; use another out_dir or delete the checkpoint")
        if state.get("global_batch", self.global_batch) != self.global_batch:
            distributed.print0(f"warning: resuming with global batch {self.global_batch}, the "
                               f"checkpoint used {state['global_batch']}: not an exact resume")
        self.learner.load_state_dict(state)
        distributed.print0(f"resumed from {self.checkpoints.latest} at step {self.learner.step}")

    def open(self) -> None:
        """Resume (after its checks), then config.yaml, the metrics cut back to the resumed step, and
        the temp files of a killed writer removed (rank 0)."""
        self.resume()
        if self.dist.is_main:
            for folder in (self.out, self.checkpoints.folder):
                remove_stale_temps(folder)
            with atomic_open(self.out / "config.yaml", "w") as f:
                f.write(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False, default_flow_style=None))
            self.metrics.resume(self.learner.step)
            distributed.print0(self.describe())

    def log(self, step_loss: _StepLoss, window: dict, grad_norm: float) -> None:
        """One metrics.jsonl line: the loss and its terms averaged over the steps since the last
        one (the terms over every process too), the learning rate, the last gradient norm."""
        n = self.learner.step - window["step"]
        terms = distributed.all_reduce_mean(step_loss.sums.to(self.device)).cpu() / n
        if self.dist.is_main:
            record = {"step": self.learner.step, "loss": window["loss"] / n, "grad_norm": grad_norm,
                      "lr": self.learner.optimizer.param_groups[0]["lr"], "time": time.time(),
                      **{name: float(v) for name, v in zip(_TERMS, terms)}}
            self.metrics.append(record)
        step_loss.sums.zero_()
        window.update(step=self.learner.step, loss=0.0)

    def fit(self) -> Path:
        cfg, learner = self.cfg, self.learner
        self.open()
        batches = StreamLoader(self.dataset, self.stream, learner.step, cfg.num_workers)
        step_loss = _StepLoss(cfg, learner.ddp_model, batches, self.stream, self.latent_shape,
                              self.perceptual)
        window = {"step": learner.step, "loss": 0.0}
        learner.ddp_model.train()
        bar = progress_bar(self.progress and self.dist.is_main, cfg.steps, learner.step, "train vae")
        with bar, StopOnInterrupt() as interrupt:
            while learner.step < cfg.steps:
                loss, grad_norm = learner.train_step(step_loss)
                step = learner.step
                window["loss"] += loss
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.log(step_loss, window, grad_norm)
                if cfg.sample_every and step % cfg.sample_every == 0 and self.dist.is_main:
                    grid = self.out / "samples" / f"step_{step:07d}.png"
                    _reconstruction_grid(learner.ema.model, self.grid_x, grid)
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save()
                status = stop_status(interrupt, self.device)
                if status is not None and step < cfg.steps:
                    self.stop(status)
        return self.finish()

    def stop(self, status: str) -> None:
        """Write the checkpoint (and the loss plot) and raise :class:`VAETrainingStopped`."""
        self.save()
        self.plot()
        raise VAETrainingStopped(status, f"{status} at step {self.learner.step}; checkpoint written "
                                         f"to {self.checkpoints.latest}; run again to resume")

    def plot(self) -> None:
        """loss.png: the loss and its unweighted terms per logged step (rank 0)."""
        records = self.metrics.records
        if not (self.dist.is_main and records):
            return
        steps = [r["step"] for r in records]
        series = {name: (steps, [r[name] for r in records]) for name in ("loss", *_TERMS)}
        save_line_plot(series, self.out / "loss.png", title="VAE training loss", logy=True)

    def finish(self) -> Path:
        """The last checkpoint, the loss plot and ``out_dir/vae``: the EMA weights (the trained
        ones when ``ema_decay`` is 0: the EMA copy then follows them exactly) with save_pretrained,
        a new VAE's config carrying its measured scaling_factor."""
        self.save()
        self.plot()
        vae_dir, vae = self.out / "vae", self.learner.ema.model
        if self.dist.is_main:
            note = f"scaling_factor {vae.config.scaling_factor} (as loaded)"
            if self.cfg.from_scratch:
                factor, std = measure_scaling_factor(vae, self.dataset)
                vae.register_to_config(scaling_factor=factor)
                note = f"scaling_factor 1 / {std:.4g} = {factor:.6g} (std of the posterior means)"
            vae.save_pretrained(vae_dir)
            distributed.print0(f"done: {self.learner.step} steps; VAE in {vae_dir}, {note}; "
                               f"loss curve {self.out / 'loss.png'}")
        distributed.barrier()
        return vae_dir


def train_vae(cfg: VAETrainConfig, perceptual_net: nn.Module | None = None, progress: bool = True) -> Path:
    """Train the VAE ``cfg`` describes; resume from ``out_dir/checkpoints/latest.pt``.

    Writes into ``cfg.out_dir`` (rank 0): ``config.yaml``; ``checkpoints/latest.pt`` (step, config,
    weights, EMA weights, optimizer; atomic) every ``save_every`` steps and at the end;
    ``samples/step_XXXXXXX.png`` reconstruction grids of the EMA weights (originals on top);
    ``metrics.jsonl`` (a line per ``log_every`` steps); and at the end ``loss.png`` and ``vae/``,
    the EMA VAE in diffusers format, which ``AutoencoderKL.from_pretrained``,
    ``Autoencoder.load(out_dir / "vae")`` and every ``--vae`` read. Under torchrun each process
    trains on its slice of the global batch (``batch_size`` x processes).

    Args:
        cfg: the run's configuration.
        perceptual_net: used instead of what ``cfg.perceptual`` names when given: any module mapping
            ``(x_rec, x)`` in ``[-1, 1]`` to per-sample or scalar distances. It is moved to the
            device and frozen (eval mode, ``requires_grad=False``) in place. Needs
            ``perceptual != "none"``.
        progress: show the progress (a bar on a terminal, a line per interval elsewhere).

    Ctrl-C (or SIGTERM) finishes the current step, writes the checkpoint and raises
    :class:`VAETrainingStopped` (a ``KeyboardInterrupt``); running again resumes.

    Returns:
        The folder of the saved VAE (``out_dir/vae``).
    """
    if perceptual_net is not None and cfg.perceptual == "none":
        raise ConfigError("perceptual: is 'none', but a perceptual network was passed; set "
                          "perceptual: lpips (the network replaces it) or pass none")
    dist, device = distributed.init(cfg.device)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir: {out} exists and is not a folder")
    with lock_run_dir(out, "train-vae"):  # one writer at a time
        return _VAERun(cfg, perceptual_net, progress, dist, device).fit()


def finetune_vae(cfg: VAEFinetuneConfig, perceptual_net: nn.Module | None = None,
                 progress: bool = True) -> Path:
    """Fine-tune ``cfg.vae`` on ``cfg.images``: :func:`train_vae` of
    :meth:`VAEFinetuneConfig.to_train_config` (same outputs, same resume; the decoder only unless
    ``train_encoder``; the saved VAE is the EMA copy and keeps its scaling_factor)."""
    return train_vae(cfg.to_train_config(), perceptual_net, progress)


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
