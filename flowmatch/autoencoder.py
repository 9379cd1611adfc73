"""The frozen image autoencoder of latent flow matching, and the one owner of the latent scaling.

A latent model never sees pixels: images ``x`` in ``[-1, 1]`` of shape ``(B, 3, H, W)`` go through
a diffusers ``AutoencoderKL`` encoder to a diagonal Gaussian posterior ``q(z | x) = N(m, s^2)`` of
shape ``(B, C, H / f, W / f)`` (``f = 2 ** (len(block_out_channels) - 1)``, 8 for the Stable
Diffusion VAEs), and generated latents go back through its decoder. The raw latents are not unit
scale (the SD VAEs' ``m`` has a standard deviation of about 5), so they are normalised on the way in
and un-normalised on the way out -- by :class:`LatentNormalization`, and nowhere else::

    "scaling":  z = (z_raw - shift_factor) * scaling_factor       (the diffusers convention;
                                                                    shift_factor 0 when the VAE
                                                                    has none)
    "channel":  z_c = (z_raw_c - mean_c) / std_c                   (per channel c; mean/std of the
                                                                    raw latents measured on the
                                                                    data set, e.g. by a latent
                                                                    store)

Which to prefer: ``"channel"`` when statistics of *your* data are at hand (a latent store measures
them over the whole set): every channel then has zero mean and unit variance, which is what the
flow's noise ``x0 ~ N(0, I)`` assumes. ``"scaling"`` is the VAE authors' single global factor,
fitted on their training data; it is the default because it needs no data, and what a model
trained by another library expects.

diffusers is an optional extra (``pip install 'flowmatch[vae]'``), imported only when a VAE is
loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "NORMALIZATION_KINDS",
    "Autoencoder",
    "LatentNormalization",
    "VAEFolderNotFound",
    "VAELoadError",
    "load_vae",
    "vae_source",
]

NORMALIZATION_KINDS = ("scaling", "channel")
_INSTALL_HINT = "pip install 'flowmatch[vae]'"


# ----------------------------------------------------------------------------------------------
# Latent normalisation
# ----------------------------------------------------------------------------------------------


@dataclass
class LatentNormalization:
    """The affine map between raw VAE latents ``z_raw`` and the latents ``z`` a flow model sees.

    Fields:
        kind: ``"scaling"`` -- ``z = (z_raw - shift_factor) * scaling_factor`` -- or
            ``"channel"`` -- ``z[:, c] = (z_raw[:, c] - mean[c]) / std[c]``.
        scaling_factor, shift_factor: the VAE's global factors (``vae.config.scaling_factor``,
            ``vae.config.shift_factor`` or 0.0 when it has none). Kept for ``"channel"`` too, as a
            record of the VAE, but unused there.
        mean, std: per-channel statistics of the raw latents, length ``C``; required by
            ``"channel"`` (every ``std > 0``), ``None`` for ``"scaling"``.

    Tensors are ``(B, C, h, w)``; both maps are elementwise, so any leading shape with channels at
    dim 1 works. ``normalize(denormalize(z)) == z`` up to float rounding.
    """

    kind: str = "scaling"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATION_KINDS:
            raise ValueError(f"normalization kind must be one of {NORMALIZATION_KINDS}, got {self.kind!r}")
        self.scaling_factor = float(self.scaling_factor)
        self.shift_factor = float(self.shift_factor)
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor != 0.0):
            raise ValueError(f"scaling_factor must be finite and non-zero, got {self.scaling_factor}")
        if self.kind == "channel":
            if self.mean is None or self.std is None:
                raise ValueError("normalization 'channel' needs per-channel mean and std")
            self.mean = [float(v) for v in self.mean]
            self.std = [float(v) for v in self.std]
            if len(self.mean) != len(self.std) or not self.mean:
                raise ValueError(
                    f"mean and std must have one value per channel (got {len(self.mean)} and "
                    f"{len(self.std)})")
            if not all(math.isfinite(s) and s > 0 for s in self.std):
                raise ValueError(f"every channel std must be finite and > 0, got {self.std}")
            if not all(math.isfinite(m) for m in self.mean):
                raise ValueError(f"every channel mean must be finite, got {self.mean}")

    @classmethod
    def from_vae_config(cls, config: Any) -> LatentNormalization:
        """``"scaling"`` with a diffusers VAE config's ``scaling_factor`` / ``shift_factor``."""
        scaling = getattr(config, "scaling_factor", None)
        shift = getattr(config, "shift_factor", None)
        return cls("scaling", 1.0 if scaling is None else scaling, 0.0 if shift is None else shift)

    def _coefficients(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``z = (z_raw - a) * b``, shaped to broadcast over ``(B, C, h, w)``."""
        if self.kind == "scaling":
            a = torch.tensor(self.shift_factor, dtype=z.dtype, device=z.device)
            b = torch.tensor(self.scaling_factor, dtype=z.dtype, device=z.device)
            return a, b
        if z.ndim < 2 or z.shape[1] != len(self.mean):
            raise ValueError(
                f"normalization has {len(self.mean)} channels, the latents have shape {tuple(z.shape)}")
        view = (1, -1) + (1,) * (z.ndim - 2)
        a = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(view)
        b = 1.0 / torch.tensor(self.std, dtype=torch.float64).to(z.device, z.dtype).view(view)
        return a, b

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``(B, C, h, w)`` -> model latents ``z = (z_raw - a) * b``."""
        a, b = self._coefficients(z_raw)
        return (z_raw - a) * b

    def normalize_(self, z_raw: torch.Tensor) -> torch.Tensor:
        """In-place :meth:`normalize` (no new allocation), for readers that own the tensor."""
        a, b = self._coefficients(z_raw)
        return z_raw.sub_(a).mul_(b)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents ``(B, C, h, w)`` -> raw VAE latents ``z_raw = z / b + a``."""
        a, b = self._coefficients(z)
        return z / b + a

    def scale_std(self, std_raw: torch.Tensor) -> torch.Tensor:
        """A posterior standard deviation in raw units -> in normalised units (``std_raw * b``).

        The map is affine, so ``z_raw = m + s * eps`` becomes ``z = normalize(m) + scale_std(s) * eps``.
        """
        _, b = self._coefficients(std_raw)
        return std_raw * b

    def to_dict(self) -> dict:
        """Plain JSON types (str, float, list or None), e.g. for meta.json or a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LatentNormalization:
        unknown = set(d) - {"kind", "scaling_factor", "shift_factor", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown LatentNormalization keys: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class VAELoadError(RuntimeError):
    """A VAE's weights could not be fetched or read (bad id, no network, unreadable folder)."""


class VAEFolderNotFound(VAELoadError, FileNotFoundError):
    """``source`` names a local folder that does not exist; raised before any network access.

    Also a ``FileNotFoundError``, what a missing folder was reported as before."""


# A Hugging Face Hub id: "name" or "org/name", letters, digits, "_", "-", "." (not leading).
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local folder rather than a Hub id like ``org/name``.

    A Hub id is ``name`` or ``org/name`` (see ``_HUB_ID``); anything else (``./vae``,
    ``/data/vae``, ``runs/x/vae``, ``vae_dir/``, ``~/vae``, ``C:\\vae``) names a folder. A bare
    ``vae`` or ``data/vae`` is a Hub id unless such a folder exists -- which is why a VAE used from
    a folder is recorded by its absolute path (:func:`vae_source`).
    """
    return _HUB_ID.fullmatch(source) is None


def vae_source(source: str | os.PathLike) -> str:
    """How a VAE source is recorded (latent stores, checkpoints): an existing local folder by its
    absolute path, so the record still finds it from another working directory; a Hub id as is."""
    source = str(source)
    local = Path(source).expanduser()
    return os.path.abspath(local) if local.is_dir() else source


def load_vae(
    source: str | os.PathLike,
    *,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder or a Hugging Face Hub id, as it is.

    Nothing is frozen here: :meth:`Autoencoder.load` freezes it for encoding; VAE fine-tuning
    trains it.

    Raises:
        ImportError: diffusers is not installed (the message says how to install it).
        VAEFolderNotFound: ``source`` looks like a local path (see ``_looks_like_path``) and is not
            a folder (a ``VAELoadError`` and a ``FileNotFoundError``); the network is not tried.
        RuntimeError: the folder or Hub repository could not be read or fetched (no network, a
            wrong id, a gated repository...); the original message is included.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(f"the VAE needs diffusers: {_INSTALL_HINT}") from error
    source = str(source)
    local = Path(source).expanduser()
    if not local.is_dir() and _looks_like_path(source):
        # No Hub id looks like this: asking the Hub would only retry for half a minute.
        raise VAEFolderNotFound(f"VAE folder {source!r}: no such folder; pass --vae to say where "
                                "it is now")
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.is_dir() else source, **kwargs)
    except (OSError, ValueError) as error:  # the Hub's errors derive from these
        where = f"the local folder {source!r}" if local.is_dir() else (
            f"the Hugging Face Hub id {source!r} (no local folder of that name exists)")
        sub = f" (subfolder {subfolder!r})" if subfolder else ""
        raise VAELoadError(
            f"could not load VAE weights from {where}{sub}: the weights could not be fetched or "
            f"read. Check the id and your network (or download the VAE once and pass its folder). "
            f"Original error: {error}"
        ) from error
    return vae.to(device)


# ----------------------------------------------------------------------------------------------
# The frozen wrapper
# ----------------------------------------------------------------------------------------------


class Autoencoder:
    """A frozen ``AutoencoderKL`` plus its :class:`LatentNormalization`: images <-> model latents.

    The VAE is put in eval mode with ``requires_grad=False`` and every method runs under
    ``torch.no_grad()``: it is a fixed feature map for the flow model, never trained through this
    wrapper (VAE fine-tuning, :mod:`flowmatch.training.vae`, has its own code path) and never
    wrapped in DDP (it has no gradients to synchronise; each process holds its own copy).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        normalization: how raw latents are scaled (see the module docstring).
        source: where the VAE came from (Hub id, or a folder's absolute path: :func:`vae_source`),
            recorded in latent stores and hence in checkpoints.
    """

    def __init__(self, vae: nn.Module, normalization: LatentNormalization, source: str):
        self.vae = vae.eval().requires_grad_(False)
        self.normalization = normalization
        self.source = vae_source(source)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        *,
        subfolder: str | None = None,
        normalization: LatentNormalization | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Autoencoder:
        """Load a VAE (Hub id such as ``"stabilityai/sd-vae-ft-ema"``, or a local folder written by
        ``save_pretrained``) and freeze it. Default normalisation: ``"scaling"`` with the VAE
        config's factors. Errors: see :func:`load_vae`.
        """
        vae = load_vae(source, subfolder=subfolder, device=device, dtype=dtype)
        if normalization is None:
            normalization = LatentNormalization.from_vae_config(vae.config)
        return cls(vae, normalization, str(source))

    # -- facts -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        """Channels of the images the VAE reads (``in_channels``: 3 for RGB VAEs, 1 for grey ones)."""
        return int(getattr(self.vae.config, "in_channels", 3))

    @property
    def downsample_factor(self) -> int:
        """``f``: a ``(c, H, W)`` image has ``(C, H / f, W / f)`` latents."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a square ``image_size`` image."""
        f = self.downsample_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling "
                             f"factor {f}")
        return (self.latent_channels, image_size // f, image_size // f)

    def to(self, device: str | torch.device) -> Autoencoder:
        self.vae.to(device)
        return self

    def enable_tiling(self) -> None:
        """Encode/decode big images tile by tile (diffusers' tiling) to bound memory."""
        self.vae.enable_tiling()

    def enable_slicing(self) -> None:
        """Let diffusers run the VAE one image at a time inside a batch."""
        self.vae.enable_slicing()

    # -- images <-> latents ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``q(z_raw | x) = N(m, s^2)`` of images ``(B, c, H, W)`` in ``[-1, 1]``
        (``c`` = :attr:`image_channels`).

        Returns ``(m, s)``, each ``(B, C, H / f, W / f)`` float32 on the VAE's device, in *raw*
        (un-normalised) units: what a latent store keeps.
        """
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"expected images (B, {self.image_channels}, H, W) for this VAE, got "
                             f"shape {tuple(images.shape)}")
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images ``(B, c, H, W)`` in ``[-1, 1]`` -> normalised latents ``z`` ``(B, C, h, w)``.

        ``sample=False`` takes the posterior mean ``m``; ``sample=True`` draws
        ``z_raw = m + s * eps``, ``eps ~ N(0, I)`` from ``generator`` (on the generator's device).
        """
        mean, std = self.encode_moments(images)
        z_raw = mean
        if sample:
            g_device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=g_device).to(mean.device)
            z_raw = mean + std * eps
        return self.normalization.normalize(z_raw)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)`` -> images ``(B, c, h f, w f)`` in ``[-1, 1]``.

        ``z`` is un-normalised first (``z_raw = normalization.denormalize(z)``); the output is
        clamped to ``[-1, 1]`` and float32. ``batch_size`` decodes that many latents at a time,
        bounding peak memory for a large ``B``.
        """
        if z.ndim != 4:
            raise ValueError(f"expected latents (B, C, h, w), got shape {tuple(z.shape)}")
        step = batch_size or max(len(z), 1)
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for start in range(0, len(z), step):
            z_raw = self.normalization.denormalize(z[start:start + step].float())
            x = self.vae.decode(z_raw.to(self.device, self.dtype)).sample
            out.append(x.float().clamp(-1.0, 1.0))
        if not out:
            f = self.downsample_factor
            shape = (0, int(self.vae.config.out_channels), z.shape[2] * f, z.shape[3] * f)
            return torch.zeros(shape, device=self.device)
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"Autoencoder(source={self.source!r}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample_factor}, normalization={self.normalization.kind!r})")
