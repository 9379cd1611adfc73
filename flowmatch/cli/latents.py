"""``flowmatch encode-latents``: encode an image folder (or the built-in digits) once with a frozen
VAE into a latent store."""

from __future__ import annotations

import argparse

from flowmatch.cli.common import (
    EXIT_OK,
    RESIZE_HELP,
    add_command,
    add_device,
    add_no_progress,
    add_vae_input,
)

__all__ = ["add_parser", "run"]

_DESCRIPTION = (
    "Encode every image of a folder (flat, or one sub-folder per class) or of a built-in data set "
    "(--dataset digits: the scikit-learn digits with their classes 0..9) with an AutoencoderKL into "
    "a memory-mapped latent store that `data: {kind: latents, path: STORE}` trains on. Re-running "
    "resumes a half-written store. Works under torchrun (ranks split the images).")
_DATASETS = ("digits",)
_SPLITS = ("train", "test", "all")
_IMAGE_SIZE, _DIGITS_SIZE = 256, 16  # --image-size defaults: folders, digits


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "encode-latents",
                    help="encode an image folder or the digits once with a frozen VAE into a "
                         "latent store",
                    description=_DESCRIPTION)
    images = p.add_mutually_exclusive_group(required=True)
    add_vae_input(p, "VAE: a Hugging Face Hub id (e.g. stabilityai/sd-vae-ft-ema) or a local "
                     "folder written by save_pretrained", images_group=images)
    images.add_argument("--dataset", choices=_DATASETS,
                        help="a built-in data set instead of --images: digits (1 channel, grey "
                             "images repeated for an RGB VAE; labels and classes 0..9)")
    p.add_argument("--split", choices=_SPLITS, default=None,
                   help="split of --dataset (default: train)")
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--image-size", type=int, default=None,
                   help=RESIZE_HELP + f" (default: {_IMAGE_SIZE}; with --dataset digits the size "
                   f"the 8x8 digits are resized to, default {_DIGITS_SIZE})")
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE batch")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage precision")
    p.add_argument("--store-posterior", action="store_true",
                   help="also store the posterior std, so training can draw a fresh latent each time "
                        "(data.sample_posterior: true)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store made from other settings")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    add_device(p)
    add_no_progress(p)
    p.set_defaults(handler=run)
    return p


def _images(args: argparse.Namespace) -> tuple[object, int]:
    """What to encode and its image size: the --images folder, or the --dataset built with its
    --split and size."""
    if args.dataset is None:
        if args.split is not None:
            raise ValueError("--split applies only to --dataset (an image folder has no splits)")
        return args.images, args.image_size or _IMAGE_SIZE
    from flowmatch.data.digits import Digits

    size = args.image_size or _DIGITS_SIZE
    return Digits(image_size=size, split=args.split or "train"), size


def run(args: argparse.Namespace) -> int:
    from flowmatch import distributed
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.data.latents import encode_to_store

    images, image_size = _images(args)
    info, device = distributed.init(args.device)
    try:
        autoencoder = Autoencoder.load(args.vae, subfolder=args.vae_subfolder, device=device)
        path = encode_to_store(autoencoder, images, args.out, image_size=image_size,
                               batch_size=args.batch_size, flip=args.flip, dtype=args.dtype,
                               store_posterior=args.store_posterior, overwrite=args.overwrite,
                               progress=not args.no_progress and info.is_main, rank=info.rank,
                               world_size=info.world_size, num_workers=args.num_workers)
    finally:
        distributed.cleanup()
    if info.is_main:
        from flowmatch.data.latents import read_store_meta

        meta = read_store_meta(path)
        print(f"wrote {meta['count']} latents of shape {tuple(meta['shape'])} to {path} "
              f"(channel mean {[round(v, 3) for v in meta['channel_mean']]}, "
              f"std {[round(v, 3) for v in meta['channel_std']]})")
    return EXIT_OK
