"""Helpers for the VAE tests: a tiny AutoencoderKL saved locally, and small generated images.

No weights are downloaded anywhere in the tests: the VAE is built from a config with random
weights (tens of thousands of parameters, downsampling by 2) and written with ``save_pretrained``.
Test files in sub-folders import this module after putting ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY_BLOCKS = (8, 16)  # two resolution levels: latents are images / 2
TINY_LATENT_CHANNELS = 4


def make_tiny_vae(folder: Path, seed: int = 0, scaling_factor: float = 0.5,
                  shift_factor: float | None = 0.1) -> Path:
    """Build a random tiny ``AutoencoderKL`` and ``save_pretrained`` it into ``folder``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(TINY_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_BLOCKS),
        block_out_channels=TINY_BLOCKS,
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    vae.save_pretrained(folder)
    return Path(folder)


def make_images(folder: Path, n: int = 6, classes: tuple[str, ...] = (), seed: int = 0) -> list[Path]:
    """Write ``n`` smooth random RGB PNGs of mixed sizes (per class sub-folder if ``classes``).

    Images are low-frequency colour fields plus a little noise and a bright square, so they have
    structure (a VAE reconstructs them better than noise) and are not left-right symmetric.
    """
    rng = np.random.default_rng(seed)
    sizes = [(40, 32), (32, 48), (64, 64), (50, 37), (36, 36), (80, 44)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(1, 4, size=3)
        image = np.stack([np.sin(freq[c] * (xx + 0.5 * yy) * np.pi + phase[c]) for c in range(3)], -1)
        image = 0.5 + 0.4 * image + 0.05 * rng.standard_normal((h, w, 3))
        image[h // 4: h // 2, w // 8: w // 3] = 1.0  # an off-centre square: not mirror-symmetric
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        sub = Path(folder) / classes[i % len(classes)] if classes else Path(folder)
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class PoolingAutoencoder:
    """A duck-typed stand-in for ``flowmatch.autoencoder.Autoencoder`` without diffusers.

    ``encode_moments``: mean = a fixed 1x1 colour mix of 2x2 average-pooled pixels (4 channels),
    std = a positive function of it. Cheap to import in subprocesses (the two-process store test),
    and deterministic per image, whatever the batch composition.
    """

    source = "pooling-stand-in"
    image_channels = 3

    def __init__(self):
        import torch

        from flowmatch.autoencoder import LatentNormalization

        self.normalization = LatentNormalization("scaling", 0.5, 0.0)
        self.mix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.5, 0.5, 3.0]])

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (4, image_size // 2, image_size // 2)

    def encode_moments(self, x):
        import torch.nn.functional as F

        pooled = F.avg_pool2d(x.float(), 2)  # (B, 3, H/2, W/2)
        mean = (self.mix @ pooled.flatten(2)).view(len(x), 4, *pooled.shape[2:])
        return mean, 0.1 + mean.abs() * 0.01
