"""``flowmatch train-vae CONFIG``, ``flowmatch finetune-vae CONFIG`` and ``flowmatch recon``: train a
VAE (from scratch or from a pretrained one), fine-tune a pretrained one's decoder, check its
reconstructions."""

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
    training_exit_code,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    """Adds ``train-vae``, ``finetune-vae`` and then ``recon``."""
    tv = add_command(subparsers, "train-vae", help="train an AutoencoderKL (from scratch or a pretrained one)",
                     description=(
                         "Train a diffusers AutoencoderKL on the digits or an image folder (data.kind):\n"
                         "reconstruction (l1 | mse) + KL + an optional perceptual term, EMA, resumable\n"
                         "checkpoints, reconstruction grids, metrics.jsonl and loss.png in OUT_DIR.\n"
                         "vae: \"\" builds a new VAE from the config's architecture fields and sets its\n"
                         "scaling_factor to 1 / std of its posterior means; vae: ID_OR_DIR starts from a\n"
                         "pretrained one (train_encoder: false trains the decoder only). Under torchrun\n"
                         "each process takes its slice of the global batch (batch_size x processes).\n"
                         "The VAE is saved with save_pretrained in OUT_DIR/vae: pass --vae OUT_DIR/vae\n"
                         "to encode-latents, recon, sample. Re-running the same command resumes."))
    add_config_args(tv, "YAML file (see configs/digits_vae.yaml)",
                    "dotted overrides, e.g. steps=200 data.image_size=16 block_out_channels=[32,64]")
    tv.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_no_progress(tv)
    tv.set_defaults(handler=run)

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
    if args.command == "recon":
        return _recon(args)
    return _train(args) if args.command == "train-vae" else _finetune(args)


def _dump(cfg) -> str:
    import yaml

    from flowmatch.config import config_to_dict

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def _train(args: argparse.Namespace) -> int:
    from flowmatch.config import load_dataclass
    from flowmatch.training.vae import VAETrainConfig

    cfg = load_dataclass(VAETrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(_dump(cfg), end="")
        return EXIT_OK
    return _fit(cfg, args.no_progress, "trained")


def _finetune(args: argparse.Namespace) -> int:
    from flowmatch.config import load_dataclass
    from flowmatch.training.vae import VAEFinetuneConfig

    cfg = load_dataclass(VAEFinetuneConfig, args.config, args.overrides)
    if args.dry_run:
        print(_dump(cfg), end="")
        return EXIT_OK
    return _fit(cfg.to_train_config(), args.no_progress, "fine-tuned")


def _fit(cfg, no_progress: bool, what: str) -> int:
    """``train_vae(cfg)`` -> exit code: 0 done, 1 diverged, 130 / 143 stopped by Ctrl-C / SIGTERM
    after writing the checkpoint (running again resumes)."""
    from flowmatch import distributed
    from flowmatch.training.vae import VAETrainingStopped, train_vae

    def fit() -> str:
        try:
            out = train_vae(cfg, progress=not no_progress)
        except VAETrainingStopped as stopped:
            distributed.print0(stopped)
            return stopped.status
        distributed.print0(f"{what} VAE saved to {out}")
        return "finished"

    return training_exit_code(fit)


def _recon(args: argparse.Namespace) -> int:
    from flowmatch import distributed
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.training.vae import reconstruct

    _, device = distributed.init(args.device)
    autoencoder = Autoencoder.load(args.vae, subfolder=args.vae_subfolder, device=device)
    res = reconstruct(autoencoder, args.images, args.out, n=args.n, image_size=args.image_size)
    print(f"PSNR {res['psnr']:.2f} dB over {res['n']} images; grid {args.out}")
    return EXIT_OK
