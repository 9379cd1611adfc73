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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (same samples up to float rounding; faster for "
                        "many samples) (default: the run's sample.compile)")
    add_no_progress(p, "no progress bar (folder output)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from flowmatch import distributed
    from flowmatch.config import ConfigError
    from flowmatch.run import Run

    if args.n < 1:
        raise ConfigError("--n: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    out, job = Path(args.out), sample_job(args)
    if out.suffix == "":  # a folder of PNGs: resumable, split over torchrun ranks
        return _sample_folder(args.checkpoint, out, job)
    _, device = distributed.init(job.device)
    run = Run.for_job(args.checkpoint, job, device=device)
    settings = run.settings(job.solver, label=job.label)
    batches = [res for _, res in run.sample_batches(range(job.n), settings, job)]
    x = torch.cat([res.x.cpu() for res in batches])  # (n, *data_shape)
    if run.is_latent and out.suffix != ".npy":
        x = run.decode(x, vae=job.vae, batch_size=job.batch_size).cpu()  # (n, 3, H, W)
    # a grid shows one class a column when there are few classes and no --class
    nrow = run.num_classes if run.num_classes and run.num_classes <= 16 and job.label is None else None
    write_samples(x, out, nrow=nrow)
    guided = ""
    if job.guidance.active:  # a guided call runs the network twice
        passes = max(res.network_evals for res in batches)
        guided = f", {passes} network passes with guidance w={job.guidance.scale}"
    print(f"wrote {job.n} samples to {out} ({settings.method}, {settings.steps} steps, "
          f"NFE {max(res.nfe for res in batches)} per sample{guided})")
    return EXIT_OK


def sample_job(args: argparse.Namespace):
    """The :class:`~flowmatch.run.SampleJob` the command line describes."""
    from flowmatch.run import SampleJob

    return SampleJob.from_options(
        n=args.n, seed=args.seed, method=args.method, steps=args.steps, nfe=args.nfe, grid=args.grid,
        grid_shift=args.grid_shift, diffusion=args.diffusion, diffusion_norm=args.diffusion_norm,
        cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval), batch_size=args.batch_size,
        label=args.label, use_ema=not args.no_ema, vae=args.vae, device=args.device,
        progress=not args.no_progress, compile=args.compile)


def _sample_folder(checkpoint: str, out: Path, job) -> int:
    """``--out DIR``: one PNG per sample index, resumable, the ranks of a torchrun job sharing it."""
    from flowmatch import distributed
    from flowmatch.evaluation import sample_to_folder

    try:
        r = sample_to_folder(checkpoint, out, job)
    finally:
        distributed.cleanup()
    distributed.print0(f"wrote {r['written']} samples to {out} ({r['skipped']} already there, "
                       f"{r['n']} in all; NFE {r['nfe']} per sample, {r['seconds']:.1f} s)")
    return EXIT_OK


def write_samples(x, out: Path, nrow: int | None = None) -> None:
    """:func:`flowmatch.run.save_samples` for ``--out``: ``.npy``, ``.png`` (an image grid or a 2-D
    scatter plot); anything else is a ConfigError naming ``--out``."""
    from flowmatch.config import ConfigError
    from flowmatch.run import save_samples

    if out.suffix == ".pt":
        raise ConfigError(f"--out: unsupported suffix {out.suffix!r} (use .png, .npy, or a folder)")
    try:
        save_samples(x, out, nrow=nrow)
    except ValueError as e:
        raise ConfigError(f"--out: {e}") from None
