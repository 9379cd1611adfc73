"""The ``flowmatch`` command line: thin wrappers around the library.

    flowmatch train CONFIG [key=value ...] [--dry-run] [--no-resume]
    flowmatch sample RUN_DIR_OR_CHECKPOINT [--n N] [--steps K] [--method heun] [--out grid.png]
    flowmatch info CONFIG [key=value ...]
    flowmatch encode-latents --vae ID_OR_DIR --images DIR --out STORE [--flip]
    flowmatch finetune-vae CONFIG [key=value ...]
    flowmatch recon --vae DIR --images DIR [--out recon.png]
    flowmatch eval fid --samples DIR --ref DIR_OR_NPZ [--extractor inception|digits]
    flowmatch eval accuracy --samples DIR --classifier clf.pt [--image-size 16]
    flowmatch eval nll RUN_DIR_OR_CHECKPOINT [--n 512] [--split test] [--divergence auto]

Exit codes: 0 success, 1 training stopped by a non-finite loss, 2 bad input (config, checkpoint,
data), 130 interrupted by Ctrl-C after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where the help text already says where it comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not quiet and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowmatch",
        description="Train and sample flow-matching generative models "
                    "(time convention: t=0 is noise, t=1 is data).",
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="train (or resume) the experiment a YAML config describes",
                        formatter_class=_Formatter,
                        description="Train the experiment in CONFIG. Re-running the same command "
                                    "resumes from RUN_DIR/checkpoints/latest.pt.")
    tr.add_argument("config", help="experiment YAML file, e.g. configs/digits_unet.yaml")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides, e.g. train.steps=500 model.base_channels=32")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved config (every default filled in) and exit")
    tr.add_argument("--no-resume", action="store_true",
                    help="start from scratch even if the run directory holds a checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="draw samples from a trained run", formatter_class=_Formatter,
                        description="Draw samples with an ODE solver from a checkpoint (EMA weights "
                                    "by default). --out decides the format: NAME.png writes a grid "
                                    "(a scatter plot for 2-D data), NAME.npy the raw array, and a "
                                    "path without suffix a folder of PNGs named by sample index "
                                    "(000042.png) with a manifest.json of the settings: re-running "
                                    "fills in missing files only, and under torchrun the ranks "
                                    "share the work; the files do not depend on the number of "
                                    "processes or the batch size.")
    sa.add_argument("checkpoint", help="run directory (uses checkpoints/latest.pt) or checkpoint file")
    sa.add_argument("-n", "--n", type=int, default=64,
                    help="number of samples (under torchrun write -n: torchrun's own parser rejects "
                         "--n as an ambiguous abbreviation of its --nnodes/--nproc-per-node)")
    sa.add_argument("--steps", type=int, default=None,
                    help="solver steps (default: the run's sample.steps)")
    sa.add_argument("--nfe", type=int, default=None,
                    help="network evaluations per sample instead of --steps: steps = NFE / the "
                         "method's evaluations per step (an error if it does not divide)")
    sa.add_argument("--method", default=None,
                    help="ODE: euler | midpoint | heun | rk4 | ab2 | dpm2m (1 NFE/step, order 2) | "
                         "dopri5 (+ other torchdiffeq methods); SDE: euler_maruyama "
                         "(default: the run's sample.method)")
    sa.add_argument("--grid", default=None, help="time grid: uniform | shifted | edm (default: the run's)")
    sa.add_argument("--grid-shift", type=float, default=None, help="shift for --grid shifted (default: the run's sample.grid_shift)")
    sa.add_argument("--out", default="samples.png", help="output: grid .png, .npy, or a folder")
    sa.add_argument("--seed", type=int, default=0, help="sample i uses noise seeded by (seed, i)")
    sa.add_argument("--batch-size", type=int, default=256, help="samples per forward batch")
    sa.add_argument("--class", dest="label", type=int, default=None,
                    help="class label for every sample (class-conditional runs; default: cycle "
                         "through the classes)")
    sa.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    sa.add_argument("--device", default="auto", help="auto | cpu | cuda")

    sa.add_argument("--cfg-scale", type=float, default=1.0,
                    help="classifier-free guidance: v_null + w (v_cond - v_null); 1 = no guidance "
                         "(class-conditional models trained with label dropout)")
    sa.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"),
                    help="apply guidance only for t in [T_LO, T_HI] (default: 0 1, everywhere)")
    sa.add_argument("--vae", default=None,
                    help="latent models: load the decoding VAE from here instead of the recorded "
                         "source (the recorded latent normalisation is always used)")
    sa.add_argument("--diffusion", default=None,
                    help="euler_maruyama's diffusion coefficient w(t): constant | sigma | linear | "
                         "decreasing | increasing-decreasing | sbdm (default: the run's sample.diffusion)")
    sa.add_argument("--diffusion-norm", type=float, default=None,
                    help="scale of w(t) (default: the run's sample.diffusion_norm)")
    sa.add_argument("--no-progress", action="store_true", help="no progress bar (folder output)")

    for kind in ("reflow", "distill"):
        if kind == "reflow":
            d = sub.add_parser("reflow", formatter_class=_Formatter,
                               help="straighten a trained flow: retrain it on its own noise -> sample pairs",
                               description="Reflow (rectified flow): solve the teacher's ODE from "
                                           "--pairs seeded noises, then train a student (initialised "
                                           "from the teacher) on the straight paths between each noise "
                                           "and its sample. Writes OUT/pairs, the run in OUT, and the "
                                           "cost (teacher NFE, seconds) to OUT/distill.json. Re-running "
                                           "reuses the pairs and resumes the training.")
        else:
            d = sub.add_parser("distill", formatter_class=_Formatter,
                               help="distil a trained flow into a 1-4 (or any K) step Euler sampler",
                               description="Few-step distillation: record the teacher's ODE states at "
                                           "the student's K-step grid for --pairs seeded noises, then "
                                           "train a student (initialised from the teacher) so that one "
                                           "Euler step covers each segment. Sample it with `flowmatch "
                                           "sample OUT` (its config says euler, K steps). Cost in "
                                           "OUT/distill.json.")
            d.add_argument("--nfe", type=int, required=True, help="the student's steps (= its NFE)")
            d.add_argument("--grid", default="uniform", help="the student's grid: uniform | shifted | edm")
            d.add_argument("--grid-shift", type=float, default=1.0, help="shift for --grid shifted")
        d.add_argument("teacher", help="teacher run directory or checkpoint file")
        d.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides of the student's config, e.g. train.lr=5e-4")
        d.add_argument("--out", required=True, help="run directory of the student")
        d.add_argument("--pairs", type=int, default=10000, help="number of teacher trajectories")
        d.add_argument("--train-steps", type=int, default=2000, help="the student's optimizer steps")
        d.add_argument("--teacher-method", default="rk4",
                       help="the teacher's solver (fixed-step, or adaptive e.g. dopri5)")
        d.add_argument("--teacher-steps", type=int, default=None,
                       help="fixed-step teacher: steps in all (reflow, default 16) or per student "
                            "step (distill, default ceil(32 / nfe))")
        d.add_argument("--cfg-scale", type=float, default=1.0,
                       help="class-conditional teachers: classifier-free guidance of the teacher "
                            "(the student learns the guided flow)")
        d.add_argument("--seed", type=int, default=0, help="trajectory i starts from noise seeded (seed, i)")
        d.add_argument("--batch-size", type=int, default=256, help="trajectories per teacher batch")
        d.add_argument("--device", default="auto", help="auto | cpu | cuda")
        d.add_argument("--no-progress", action="store_true", help="no progress bars")

    en = sub.add_parser("encode-latents", formatter_class=_Formatter,
                        help="encode an image folder once with a frozen VAE into a latent store",
                        description="Encode every image of a folder (flat, or one sub-folder per "
                                    "class) with an AutoencoderKL into a memory-mapped latent store "
                                    "that `data: {kind: latents, path: STORE}` trains on. Re-running "
                                    "resumes a half-written store. Works under torchrun (ranks "
                                    "split the images).")
    en.add_argument("--vae", required=True,
                    help="VAE: a Hugging Face Hub id (e.g. stabilityai/sd-vae-ft-ema) or a local "
                         "folder written by save_pretrained")
    en.add_argument("--vae-subfolder", default=None, help="sub-folder of --vae holding the VAE")
    en.add_argument("--images", required=True, help="image folder")
    en.add_argument("--out", required=True, help="store folder to write")
    en.add_argument("--image-size", type=int, default=256, help="square size images are resized/cropped to")
    en.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    en.add_argument("--batch-size", type=int, default=16, help="images per VAE batch")
    en.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage precision")
    en.add_argument("--store-posterior", action="store_true",
                    help="also store the posterior std, so training can draw a fresh latent each time "
                         "(data.sample_posterior: true)")
    en.add_argument("--overwrite", action="store_true", help="replace an existing store made from other settings")
    en.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    en.add_argument("--device", default="auto", help="auto | cpu | cuda")
    en.add_argument("--no-progress", action="store_true", help="no progress bar")

    fv = sub.add_parser("finetune-vae", formatter_class=_Formatter,
                        help="fine-tune an AutoencoderKL's decoder on your images",
                        description="Fine-tune a VAE (reconstruction + KL + perceptual loss, EMA, "
                                    "resumable checkpoints); the result is saved with save_pretrained "
                                    "in OUT_DIR/vae and loads back with --vae OUT_DIR/vae.")
    fv.add_argument("config", help="YAML file (see configs/vae_finetune.yaml)")
    fv.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. steps=200")
    fv.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    fv.add_argument("--no-progress", action="store_true", help="no progress bar")

    rc = sub.add_parser("recon", formatter_class=_Formatter,
                        help="encode and decode images with a VAE: comparison grid and PSNR")
    rc.add_argument("--vae", required=True, help="Hub id or local VAE folder")
    rc.add_argument("--vae-subfolder", default=None, help="sub-folder of --vae holding the VAE")
    rc.add_argument("--images", required=True, help="image folder")
    rc.add_argument("--out", default="recon.png", help="comparison grid PNG (originals on top)")
    rc.add_argument("--n", type=int, default=16, help="number of images")
    rc.add_argument("--image-size", type=int, default=256, help="square size images are resized/cropped to")
    rc.add_argument("--device", default="auto", help="auto | cpu | cuda")

    ev = sub.add_parser("eval", help="evaluate samples (FID, classifier accuracy) or likelihoods (NLL)", formatter_class=_Formatter)
    evsub = ev.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    fid = evsub.add_parser("fid", formatter_class=_Formatter,
                           help="FID (+ precision/recall) of a sample folder against reference images or stats",
                           description="Frechet distance between the features of a folder of samples "
                                       "and a reference (a folder of images, or a cached .npz of its "
                                       "statistics). Writes SAMPLES/fid_<extractor>.json with the exact "
                                       "settings (and the sampler's manifest when present).")
    fid.add_argument("--samples", required=True, help="folder of sample PNGs")
    fid.add_argument("--ref", required=True, help="reference image folder or .npz statistics file")
    fid.add_argument("--extractor", default="inception",
                     help="feature extractor: inception (needs torch-fidelity or pytorch-fid and its "
                          "weights) | digits (a small digit classifier, see --classifier)")
    fid.add_argument("--classifier", default=None,
                     help="weights of the extractor; for digits, trained here first if the file does "
                          "not exist yet")
    fid.add_argument("--image-size", type=int, default=299, help="images are resized to this square")
    fid.add_argument("--batch-size", type=int, default=256, help="images per feature batch")
    fid.add_argument("--device", default="auto", help="auto | cpu | cuda")
    acc = evsub.add_parser("accuracy", formatter_class=_Formatter,
                           help="class-conditional check: a digit classifier's accuracy on samples",
                           description="Predicts the class of each sample of a folder written by "
                                       "'flowmatch sample --out DIR' with a digit classifier and "
                                       "compares it with the class the sample was made for (the "
                                       "manifest's label, else index %% num_classes). Writes "
                                       "SAMPLES/classifier_digits.json.")
    acc.add_argument("--samples", required=True, help="folder of sample PNGs with its manifest.json")
    acc.add_argument("--classifier", required=True,
                     help="digit classifier file (train_digit_classifier); trained here first if "
                          "it does not exist yet")
    acc.add_argument("--image-size", type=int, default=16, help="images are read at this square size")
    acc.add_argument("--batch-size", type=int, default=256, help="images per batch")
    acc.add_argument("--device", default="auto", help="auto | cpu | cuda")
    nll = evsub.add_parser("nll", formatter_class=_Formatter,
                           help="negative log-likelihood (nats, bits/dim) of data under a trained flow",
                           description="Integrates the flow backwards from each data point (t=1) "
                                       "to the noise (t=0) with the instantaneous change of "
                                       "variables, log p_1(x) = log N(x(0); 0, I) - int_0^1 div v dt. "
                                       "Prints one JSON line and writes it to RUN_DIR/nll.json (or "
                                       "--out). See flowmatch.evaluation.likelihood.")
    nll.add_argument("checkpoint", help="run directory (uses checkpoints/latest.pt) or checkpoint file")
    nll.add_argument("-n", "--n", type=int, default=512, help="number of data items (a seeded random subset)")
    nll.add_argument("--split", default=None,
                     help="data split, e.g. test (digits); default: the run's data set as trained")
    nll.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                     help="replace one of the run's data parameters, e.g. --data seed=1 "
                          "(repeatable; default: none)")
    nll.add_argument("--divergence", default="auto",
                     help="exact (one backward pass per dimension) | hutchinson (one per probe) | "
                          "auto (exact when the data has <= 16 dimensions)")
    nll.add_argument("--probe", default="rademacher", help="Hutchinson probe: rademacher | gaussian")
    nll.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample, averaged")
    nll.add_argument("--method", default=None,
                     help="ODE solver (default: dopri5 if torchdiffeq is installed, else rk4; rk4 "
                          "when --steps is given)")
    nll.add_argument("--steps", type=int, default=None, help="steps of a fixed-step method (default: 32)")
    nll.add_argument("--atol", type=float, default=1e-5, help="adaptive solver absolute tolerance")
    nll.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver relative tolerance")
    nll.add_argument("--batch-size", type=int, default=256, help="items per batch")
    nll.add_argument("--seed", type=int, default=0,
                     help="seeds the subset, and item i's dequantisation noise and probes by (seed, i)")
    nll.add_argument("--dequantize", default="auto",
                     help="auto (8bit for image data on the 8-bit grid, none otherwise) | none "
                          "(continuous density of the stored values) | 8bit (uniform "
                          "dequantisation, bits/dim of the discrete pixels)")
    nll.add_argument("--allow-approximate-prior", action="store_true",
                     help="paths whose t=0 marginal is not N(0, I) (VP): score x(0) under "
                          "N(0, sigma_0^2 I), an approximation")
    nll.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    nll.add_argument("--out", default=None, help="JSON file to write (default: RUN_DIR/nll.json)")
    nll.add_argument("--device", default="auto", help="auto | cpu | cuda")

    inf = sub.add_parser("info", help="summarise the model a config builds (exact parameter count)",
                         formatter_class=_Formatter)
    inf.add_argument("config", help="experiment YAML file")
    inf.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    return p


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _cmd_train(args) -> int:
    from flowmatch.config import dump_config, load_config
    from flowmatch.training import NonFiniteLossError, Trainer

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return EXIT_OK
    from flowmatch import distributed

    try:
        result = Trainer(cfg, resume=not args.no_resume, progress=not args.no_progress).fit()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        distributed.cleanup()
    return EXIT_INTERRUPTED if result.status == "interrupted" else EXIT_OK


def _cmd_distill(args) -> int:
    from flowmatch import distributed
    from flowmatch.training import NonFiniteLossError
    from flowmatch.training.distill import run_distill, run_reflow

    common = dict(n=args.pairs, train_steps=args.train_steps, method=args.teacher_method,
                  overrides=args.overrides, seed=args.seed, batch_size=args.batch_size,
                  cfg_scale=args.cfg_scale, device=args.device, progress=not args.no_progress)
    try:
        if args.command == "reflow":
            report = run_reflow(args.teacher, args.out, steps=args.teacher_steps or 16, **common)
        else:
            report = run_distill(args.teacher, args.out, nfe=args.nfe, grid=args.grid,
                                 grid_shift=args.grid_shift, steps_per_segment=args.teacher_steps,
                                 **common)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        distributed.cleanup()
    return EXIT_INTERRUPTED if report["train_status"] == "interrupted" else EXIT_OK


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from flowmatch import distributed
    from flowmatch.config import ConfigError
    from flowmatch.flow.paths import build_path
    from flowmatch.flow.sampling import (
        generate_with_settings,
        resolve_settings,
        seeded_noise,
    )
    from flowmatch.imageio import save_image_grid, save_scatter
    from flowmatch.training import model_from_checkpoint

    if args.n < 1:
        raise ConfigError("--n: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    out = Path(args.out)
    if out.suffix == "":  # a folder of PNGs: resumable, split over torchrun ranks
        from flowmatch.evaluation import sample_to_folder

        try:
            r = sample_to_folder(args.checkpoint, out, n=args.n, seed=args.seed, method=args.method,
                                 steps=args.steps, grid=args.grid, grid_shift=args.grid_shift,
                                 batch_size=args.batch_size, label=args.label,
                                 use_ema=not args.no_ema, vae=args.vae, device=args.device,
                                 progress=not args.no_progress, cfg_scale=args.cfg_scale,
                                 cfg_interval=tuple(args.cfg_interval), nfe=args.nfe,
                                 diffusion=args.diffusion, diffusion_norm=args.diffusion_norm)
        finally:
            distributed.cleanup()
        distributed.print0(f"wrote {r['written']} samples to {out} ({r['skipped']} already there, "
                           f"{r['n']} in all; NFE {r['nfe']} per sample, {r['seconds']:.1f} s)")
        return EXIT_OK
    _, device = distributed.init(args.device)
    model, cfg, state = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema, device=device)
    sc = cfg.sample
    data_shape = tuple(state["data_shape"])
    num_classes = int(state["num_classes"])
    s = resolve_settings(sc, method=args.method, steps=args.steps, grid=args.grid,
                         grid_shift=args.grid_shift, label=args.label, num_classes=num_classes,
                         nfe=args.nfe, diffusion=args.diffusion, diffusion_norm=args.diffusion_norm)
    method, steps = s.method, s.steps
    path = build_path(cfg.path.scheduler, **cfg.path.params)
    if args.cfg_scale != 1.0:
        from flowmatch.flow.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(model, args.cfg_scale, tuple(args.cfg_interval))

    chunks, nfe = [], 0
    for start in range(0, args.n, args.batch_size):
        idx = range(start, min(args.n, start + args.batch_size))
        x0 = seeded_noise(idx, data_shape, seed=args.seed, device=device)
        y = None
        if num_classes:
            ids = torch.tensor(list(idx), device=device)
            y = torch.full_like(ids, args.label) if args.label is not None else ids % num_classes
        res = generate_with_settings(model, x0, s, path=path, y=y, indices=list(idx), seed=args.seed,
                                     atol=sc.atol, rtol=sc.rtol)
        chunks.append(res.x.cpu())
        nfe = max(nfe, res.nfe)
    x = torch.cat(chunks)

    latent = state.get("latent")
    if latent and out.suffix != ".npy":
        from flowmatch.training import load_autoencoder_for

        autoencoder = load_autoencoder_for(latent, device=device, vae=args.vae)
        x = autoencoder.decode(x.to(device), batch_size=args.batch_size).cpu()  # (n, 3, H, W)
        data_shape = tuple(x.shape[1:])
    if out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x.numpy())
    elif out.suffix == ".png":
        if len(data_shape) == 3:
            nrow = num_classes if num_classes and num_classes <= 16 and args.label is None else None
            save_image_grid(x, out, nrow=nrow, upscale=max(1, 128 // data_shape[-1]))
        elif data_shape == (2,):
            save_scatter(x, out)
        else:
            raise ConfigError(f"--out: a .png needs image or 2-D data; this model makes {data_shape}: "
                              "use .npy")
    else:
        raise ConfigError(f"--out: unsupported suffix {out.suffix!r} (use .png, .npy, or a folder)")
    guided = ""
    if hasattr(model, "network_evals"):  # guidance: a guided call runs the network twice
        batches = -(-args.n // args.batch_size)
        guided = f", {model.network_evals // batches} network passes with guidance w={args.cfg_scale}"
    print(f"wrote {args.n} samples to {out} ({method}, {steps} steps, NFE {nfe} per sample{guided})")
    return EXIT_OK


def _cmd_encode_latents(args) -> int:
    from flowmatch import distributed
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.data.latents import encode_to_store

    info, device = distributed.init(args.device)
    try:
        autoencoder = Autoencoder.load(args.vae, subfolder=args.vae_subfolder, device=device)
        path = encode_to_store(autoencoder, args.images, args.out, image_size=args.image_size,
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


def _cmd_finetune_vae(args) -> int:
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


def _cmd_recon(args) -> int:
    from flowmatch import distributed
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.training.vae import reconstruct

    _, device = distributed.init(args.device)
    autoencoder = Autoencoder.load(args.vae, subfolder=args.vae_subfolder, device=device)
    res = reconstruct(autoencoder, args.images, args.out, n=args.n, image_size=args.image_size)
    print(f"PSNR {res['psnr']:.2f} dB over {res['n']} images; grid {args.out}")
    return EXIT_OK


def _cmd_eval(args) -> int:
    import json

    from flowmatch import distributed
    from flowmatch.config import ConfigError
    from flowmatch.evaluation.fid import eval_fid_main, train_digit_classifier

    _, device = distributed.init(args.device)
    try:
        if args.eval_command == "nll":
            return _eval_nll(args, device)
        if args.eval_command == "accuracy" or args.extractor == "digits":
            if args.classifier is None:
                raise ConfigError("--classifier: the digits extractor needs a weights file (it is "
                                  "trained there on the digits train split if it does not exist yet)")
            if not Path(args.classifier).exists():
                if distributed.is_main():  # one rank trains; the others wait for the file
                    info = train_digit_classifier(args.classifier, image_size=args.image_size)
                    print(f"trained the digit classifier: test accuracy "
                          f"{info['test_accuracy']:.4f} -> {args.classifier}")
                distributed.barrier()
        if args.eval_command == "accuracy":
            from flowmatch.evaluation.classify import classifier_accuracy

            res = classifier_accuracy(args.samples, args.classifier, args.image_size,
                                      batch_size=args.batch_size, device=device,
                                      write_json=distributed.is_main())
            distributed.print0(json.dumps({k: res[k] for k in ("accuracy", "n", "per_class")}))
            return EXIT_OK
        res = eval_fid_main(args.samples, args.ref, args.extractor, args.image_size,
                            classifier=args.classifier, batch_size=args.batch_size, device=device)
        distributed.print0(json.dumps({k: res[k] for k in ("fid", "precision", "recall", "n_samples",
                                                           "n_reference", "extractor") if k in res}))
        return EXIT_OK
    finally:
        distributed.cleanup()


def _eval_nll(args, device) -> int:
    import json

    import yaml

    from flowmatch import distributed
    from flowmatch.atomic import atomic_write_json
    from flowmatch.checkpoint import find_checkpoint
    from flowmatch.config import ConfigError
    from flowmatch.evaluation.likelihood import evaluate_nll

    data_params = {"split": args.split} if args.split is not None else {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--data: expected KEY=VALUE, got {item!r}")
        data_params[key] = yaml.safe_load(value)
    res = evaluate_nll(args.checkpoint, n=args.n, data_params=data_params, divergence=args.divergence,
                       probe=args.probe, n_probes=args.probes, method=args.method, steps=args.steps,
                       atol=args.atol, rtol=args.rtol, batch_size=args.batch_size, seed=args.seed,
                       use_ema=not args.no_ema, device=device, dequantize_mode=args.dequantize,
                       allow_approximate_prior=args.allow_approximate_prior)
    file = find_checkpoint(args.checkpoint)
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    out = Path(args.out) if args.out else run_dir / "nll.json"
    if distributed.is_main():
        atomic_write_json(out, res)
    distributed.print0(json.dumps(res))
    return EXIT_OK


def _cmd_info(args) -> int:
    from flowmatch.config import load_config
    from flowmatch.data import build_dataset
    from flowmatch.models import count_parameters
    from flowmatch.training import build_model_from_config

    cfg = load_config(args.config, args.overrides)
    if cfg.data.shape and not cfg.model.class_cond:
        # The config states the item shape: no need to open the data (it may not exist here).
        data_shape, num_classes = tuple(cfg.data.shape), 0
        data_line = f"{cfg.data.kind}, items of shape {data_shape} (from data.shape; data not read)"
    else:
        ds = build_dataset(cfg.data.kind, **cfg.data.params)
        data_shape, num_classes = tuple(ds.data_shape), int(ds.num_classes)
        data_line = f"{cfg.data.kind}, {len(ds)} items of shape {data_shape}, {num_classes} classes"
    model = build_model_from_config(cfg, data_shape, num_classes)
    total = count_parameters(model)
    print(f"experiment: {cfg.name}")
    print(f"data:       {data_line}")
    print(f"model:      {cfg.model.arch} {cfg.model.params}")
    print(f"path:       {cfg.path.scheduler} {cfg.path.params}")
    print("parameters by top-level module:")
    for name, child in model.named_children():
        n = count_parameters(child)
        if n:
            print(f"  {name:<24} {n:>14,}")
    direct = sum(p.numel() for p in model.parameters(recurse=False) if p.requires_grad)
    if direct:
        print(f"  {'(own parameters)':<24} {direct:>14,}")
    print(f"trainable parameters: {total:,} ({total / 1e6:.2f}M)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from flowmatch.config import ConfigError
    from flowmatch.training import CheckpointError

    args = build_parser().parse_args(argv)
    handlers = {"train": _cmd_train, "sample": _cmd_sample, "info": _cmd_info,
                "encode-latents": _cmd_encode_latents, "finetune-vae": _cmd_finetune_vae,
                "recon": _cmd_recon, "eval": _cmd_eval, "reflow": _cmd_distill,
                "distill": _cmd_distill}
    from flowmatch.autoencoder import VAELoadError

    try:
        return handlers[args.command](args)
    # Bad input the library reports with a clear message: config, checkpoint, missing files, data
    # problems (ValueError: empty folder, bad shapes), a VAE that cannot be fetched, a missing
    # optional package (the message says what to install). FLOWMATCH_DEBUG=1 shows the traceback.
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, VAELoadError,
            ImportError) as e:
        if os.environ.get("FLOWMATCH_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
