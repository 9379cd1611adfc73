"""``flowmatch train CONFIG [key=value ...]``: train (or resume) the experiment a YAML config describes."""

from __future__ import annotations

import argparse

from flowmatch.cli.common import (
    EXIT_OK,
    add_command,
    add_config_args,
    add_no_progress,
    training_exit_code,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "train", help="train (or resume) the experiment a YAML config describes",
                    description="Train the experiment in CONFIG. Re-running the same command "
                                "resumes from RUN_DIR/checkpoints/latest.pt.")
    add_config_args(p, "experiment YAML file, e.g. configs/digits_unet.yaml",
                    "dotted overrides, e.g. train.steps=500 model.base_channels=32")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (every default filled in) and exit")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if the run directory holds a checkpoint")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though the data, path or objective differ from the checkpoint's "
                        "(refused otherwise, naming the keys)")
    add_no_progress(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from flowmatch.components import load_experiment
    from flowmatch.config import dump_config
    from flowmatch.training import Trainer

    cfg = load_experiment(args.config, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return EXIT_OK
    return training_exit_code(
        lambda: Trainer(cfg, resume=not args.no_resume, progress=not args.no_progress,
                        force_resume=args.force_resume).fit().status)
