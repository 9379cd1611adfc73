"""The ``flowmatch`` command line: thin wrappers around the library.

    flowmatch train CONFIG [key=value ...] [--dry-run] [--no-resume]
    flowmatch sample RUN_DIR_OR_CHECKPOINT [--n N] [--steps K] [--method heun] [--out grid.png]
    flowmatch info CONFIG [key=value ...]
    flowmatch export RUN --out DIR [--raw] [--push-to-hub OWNER/NAME]
    flowmatch encode-latents --vae ID_OR_DIR --images DIR --out STORE [--flip]
    flowmatch train-vae CONFIG [key=value ...]  /  flowmatch finetune-vae CONFIG [key=value ...]
    flowmatch recon --vae DIR --images DIR [--out recon.png]
    flowmatch reflow|distill TEACHER --out DIR [--pairs N] [--nfe K]
    flowmatch eval fid --samples DIR --ref DIR_OR_NPZ [--extractor inception|digits]
    flowmatch eval accuracy --samples DIR --classifier clf.pt [--image-size 16]
    flowmatch eval nll RUN_DIR_OR_CHECKPOINT [--n 512] [--split test] [--divergence auto]

One module a sub-command (``train``, ``sample``, ``distill`` (reflow, distill), ``latents``
(encode-latents), ``vae`` (train-vae, finetune-vae, recon), ``eval``, ``info``), each with
``add_parser(subparsers)``, which registers its ``run(args) -> int`` as the parser's handler;
what they share is in :mod:`flowmatch.cli.common`.

Exit codes: 0 success, 1 training stopped by a non-finite loss, 2 bad input (config, checkpoint,
data, a run directory another process is writing), 130 interrupted by Ctrl-C and 143 by SIGTERM,
both after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from flowmatch.cli import distill, export, info, latents, sample, train, vae
from flowmatch.cli import eval as evaluate
from flowmatch.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    HelpFormatter,
)

__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]

# In the order `flowmatch --help` lists the sub-commands.
_COMMAND_MODULES = (train, sample, distill, latents, vae, evaluate, export, info)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowmatch",
        description="Train and sample flow-matching generative models "
                    "(time convention: t=0 is noise, t=1 is data).",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from flowmatch.autoencoder import VAELoadError
    from flowmatch.config import ConfigError
    from flowmatch.rundir import RunLockedError
    from flowmatch.training import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    # Bad input the library reports with a clear message: config, checkpoint, missing files, data
    # problems (ValueError: empty folder, bad shapes), a VAE that cannot be fetched, a missing
    # optional package (the message says what to install), a run directory held by another
    # process, a file system that refuses a write (read-only, full: OSError names the file).
    # FLOWMATCH_DEBUG=1 shows the traceback.
    except (ConfigError, CheckpointError, OSError, ValueError, VAELoadError, ImportError,
            RunLockedError) as e:
        if os.environ.get("FLOWMATCH_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
