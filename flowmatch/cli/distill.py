"""``flowmatch reflow`` and ``flowmatch distill``: retrain a trained flow on its own ODE solutions.

Both solve the teacher's ODE from seeded noises and train a student initialised from the teacher;
reflow on the straight noise -> sample paths, distill on the segments of a K-step Euler grid.
"""

from __future__ import annotations

import argparse

from flowmatch.cli.common import (
    GRID_HELP,
    add_command,
    add_device,
    add_no_progress,
    add_sampling_option,
    training_exit_code,
)

__all__ = ["add_parser", "run"]

_REFLOW_DESCRIPTION = (
    "Reflow (rectified flow): solve the teacher's ODE from --pairs seeded noises, then train a "
    "student (initialised from the teacher) on the straight paths between each noise and its "
    "sample. Writes OUT/pairs, the run in OUT, and the cost (teacher NFE, seconds) to "
    "OUT/distill.json. Re-running reuses the pairs and resumes the training.")
_DISTILL_DESCRIPTION = (
    "Few-step distillation: record the teacher's ODE states at the student's K-step grid for "
    "--pairs seeded noises, then train a student (initialised from the teacher) so that one Euler "
    "step covers each segment. Sample it with `flowmatch sample OUT` (its config says euler, K "
    "steps). Cost in OUT/distill.json.")


def add_parser(subparsers) -> None:
    """Adds ``reflow`` and then ``distill`` (the order ``flowmatch --help`` lists them in)."""
    reflow = add_command(subparsers, "reflow",
                         help="straighten a trained flow: retrain it on its own noise -> sample pairs",
                         description=_REFLOW_DESCRIPTION)
    _add_teacher_options(reflow)
    distill = add_command(subparsers, "distill",
                          help="distil a trained flow into a 1-4 (or any K) step Euler sampler",
                          description=_DISTILL_DESCRIPTION)
    # The student's grid: its NFE is required and its grid has a default (no run to read it from).
    add_sampling_option(distill, "--nfe", required=True, help="the student's steps (= its NFE)")
    add_sampling_option(distill, "--grid", default="uniform", help=f"the student's grid: {GRID_HELP}")
    add_sampling_option(distill, "--grid-shift", default=1.0)
    _add_teacher_options(distill)


def _add_teacher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="teacher run directory or checkpoint file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the student's config, e.g. train.lr=5e-4")
    p.add_argument("--out", required=True, help="run directory of the student")
    p.add_argument("--pairs", type=int, default=10000, help="number of teacher trajectories")
    p.add_argument("--train-steps", type=int, default=2000, help="the student's optimizer steps")
    p.add_argument("--teacher-method", default="rk4",
                   help="the teacher's solver (fixed-step, or adaptive e.g. dopri5)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="fixed-step teacher: steps in all (reflow, default 16) or per student "
                        "step (distill, default ceil(32 / nfe))")
    add_sampling_option(p, "--cfg-scale",
                        help="class-conditional teachers: classifier-free guidance of the teacher "
                             "(the student learns the guided flow)")
    p.add_argument("--seed", type=int, default=0, help="trajectory i starts from noise seeded (seed, i)")
    p.add_argument("--batch-size", type=int, default=256, help="trajectories per teacher batch")
    add_device(p)
    add_no_progress(p, "no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from flowmatch.training.distill import run_distill, run_reflow

    common = dict(n=args.pairs, train_steps=args.train_steps, method=args.teacher_method,
                  overrides=args.overrides, seed=args.seed, batch_size=args.batch_size,
                  cfg_scale=args.cfg_scale, device=args.device, progress=not args.no_progress)

    def fit() -> str:
        if args.command == "reflow":
            report = run_reflow(args.teacher, args.out, steps=args.teacher_steps or 16, **common)
        else:
            report = run_distill(args.teacher, args.out, nfe=args.nfe, grid=args.grid,
                                 grid_shift=args.grid_shift, steps_per_segment=args.teacher_steps,
                                 **common)
        return report["train_status"]

    return training_exit_code(fit)
