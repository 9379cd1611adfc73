"""``flowmatch sample RUN_DIR_OR_CHECKPOINT``: draw samples from a trained run.

``--out`` decides the output: ``NAME.png`` a grid (a scatter plot for 2-D data), ``NAME.npy`` the raw
array, a path without suffix a resumable folder of PNGs (written by
:func:`flowmatch.evaluation.sample_to_folder`, split over torchrun ranks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmatch.cli.common import (
    EXIT_OK,
    add_command,
    add_device,
    add_no_ema,
    add_no_progress,
    add_run_source,
    add_sampling_option,
)

__all__ = ["add_parser", "run", "write_samples"]

_DESCRIPTION = (
    "Draw samples with an ODE solver from a checkpoint (EMA weights by default). --out decides the "
    "format: NAME.png writes a grid (a scatter plot for 2-D data), NAME.npy the raw array, and a "
    "path without suffix a folder of PNGs named by sample index (000042.png) with a manifest.json "
    "of the settings: re-running fills in missing files only, and under torchrun the ranks share "
    "the work; the files do not depend on the number of processes or the batch size.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "sample", help="draw samples from a trained run", description=_DESCRIPTION)
    add_run_source(p)
    p.add_argument("-n", "--n", type=int, default=64,
                   help="number of samples (under torchrun write -n: torchrun's own parser rejects "
                        "--n as an ambiguous abbreviation of its --nnodes/--nproc-per-node)")
    add_sampling_option(p, "--steps", default_from="the run's sample.steps")
    add_sampling_option(p, "--nfe")
    add_sampling_option(p, "--method", default_from="the run's sample.method")
    add_sampling_option(p, "--grid", default_from="the run's")
    add_sampling_option(p, "--grid-shift", default_from="the run's sample.grid_shift")
    p.add_argument("--out", default="samples.png", help="output: grid .png, .npy, or a folder")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seeded by (seed, i)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward batch")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="class label for every sample (class-conditional runs; default: cycle "
                        "through the classes)")
    add_no_ema(p)
    add_device(p)
    add_sampling_option(p, "--cfg-scale")
    add_sampling_option(p, "--cfg-interval")
    p.add_argument("--vae", default=None,
                   help="latent models: load the decoding VAE from here instead of the recorded "
                        "source (the recorded latent normalisation is always used)")
    add_sampling_option(p, "--diffusion", default_from="the run's sample.diffusion")
    add_sampling_option(p, "--diffusion-norm", default_from="the run's sample.diffusion_norm")
    add_no_progress(p, "no progress bar (folder output)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from flowmatch import distributed
    from flowmatch.config import ConfigError
    from flowmatch.flow.paths import build_path
    from flowmatch.flow.sampling import (
        generate_with_settings,
        resolve_settings,
        seeded_noise,
    )
    from flowmatch.training import model_from_checkpoint

    if args.n < 1:
        raise ConfigError("--n: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    out = Path(args.out)
    if out.suffix == "":  # a folder of PNGs: resumable, split over torchrun ranks
        return _sample_folder(args, out)
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
    # a grid shows one class a column when there are few classes and no --class
    nrow = num_classes if num_classes and num_classes <= 16 and args.label is None else None
    write_samples(x, out, nrow=nrow)
    guided = ""
    if hasattr(model, "network_evals"):  # guidance: a guided call runs the network twice
        batches = -(-args.n // args.batch_size)
        guided = f", {model.network_evals // batches} network passes with guidance w={args.cfg_scale}"
    print(f"wrote {args.n} samples to {out} ({method}, {steps} steps, NFE {nfe} per sample{guided})")
    return EXIT_OK


def _sample_folder(args: argparse.Namespace, out: Path) -> int:
    """``--out DIR``: one PNG per sample index, resumable, the ranks of a torchrun job sharing it."""
    from flowmatch import distributed
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


def write_samples(x, out: Path, nrow: int | None = None) -> None:
    """Writes samples ``x`` of shape (n, *data_shape) to one file, chosen by ``out``'s suffix.

    ``.npy``: the array as is. ``.png``: images (n, C, H, W) as a grid of ``nrow`` columns (default:
    about square), upscaled to about 128 px a tile; 2-D points (n, 2) as a scatter plot. Anything
    else is a ConfigError naming ``--out``.
    """
    import numpy as np

    from flowmatch.config import ConfigError
    from flowmatch.imageio import save_image_grid, save_scatter

    data_shape = tuple(x.shape[1:])
    if out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x.numpy())
    elif out.suffix == ".png":
        if len(data_shape) == 3:
            save_image_grid(x, out, nrow=nrow, upscale=max(1, 128 // data_shape[-1]))
        elif data_shape == (2,):
            save_scatter(x, out)
        else:
            raise ConfigError(f"--out: a .png needs image or 2-D data; this model makes {data_shape}: "
                              "use .npy")
    else:
        raise ConfigError(f"--out: unsupported suffix {out.suffix!r} (use .png, .npy, or a folder)")

