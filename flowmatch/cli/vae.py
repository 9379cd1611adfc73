"""``flowmatch finetune-vae CONFIG`` and ``flowmatch recon``: fine-tune a VAE, check its reconstructions."""

from __future__ import annotations

import argparse

from flowmatch.cli.common import (
    EXIT_OK,
    RESIZE_HELP,
    add_command,
    add_config_args,
    add_device,
    add_no_progress,
    add_vae_input,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    """Adds ``finetune-vae`` and then ``recon``."""
    fv = add_command(subparsers, "finetune-vae", help="fine-tune an AutoencoderKL's decoder on your images",
                     description="Fine-tune a VAE (reconstruction + KL + perceptual loss, EMA, "
                                 "resumable checkpoints); the result is saved with save_pretrained "
                                 "in OUT_DIR/vae and loads back with --vae OUT_DIR/vae.")
    add_config_args(fv, "YAML file (see configs/vae_finetune.yaml)", "dotted overrides, e.g. steps=200")
    fv.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_no_progress(fv)
    fv.set_defaults(handler=run)

    rc = add_command(subparsers, "recon", help="encode and decode images with a VAE: comparison grid and PSNR")
    add_vae_input(rc, "Hub id or local VAE folder")
    rc.add_argument("--out", default="recon.png", help="comparison grid PNG (originals on top)")
    rc.add_argument("--n", type=int, default=16, help="number of images")
    rc.add_argument("--image-size", type=int, default=256, help=RESIZE_HELP)
    add_device(rc)
    rc.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return _recon(args) if args.command == "recon" else _finetune(args)


def _finetune(args: argparse.Namespace) -> int:
    from flowmatch.config import config_to_dict, load_dataclass
    from flowmatch.training.vae import VAEFinetuneConfig, finetune_vae

    cfg = load_dataclass(VAEFinetuneConfig, args.config, args.overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return EXIT_OK
    out = finetune_vae(cfg, progress=not args.no_progress)
    print(f"fine-tuned VAE saved to {out}")
    return EXIT_OK


def _recon(args: argparse.Namespace) -> int:
    from flowmatch import distributed
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.training.vae import reconstruct

    _, device = distributed.init(args.device)
    autoencoder = Autoencoder.load(args.vae, subfolder=args.vae_subfolder, device=device)
    res = reconstruct(autoencoder, args.images, args.out, n=args.n, image_size=args.image_size)
    print(f"PSNR {res['psnr']:.2f} dB over {res['n']} images; grid {args.out}")
    return EXIT_OK
