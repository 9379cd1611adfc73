"""What the sub-commands share: exit codes, the help formatter, and argument groups defined once.

The sampling options (``--method``, ``--steps``, ``--nfe``, ``--grid``, ``--grid-shift``,
``--diffusion``, ``--diffusion-norm``, ``--cfg-scale``, ``--cfg-interval``) are used by ``sample``,
``distill`` / ``reflow`` and ``eval nll``. Their flag, type and shape live in :data:`SAMPLING_OPTIONS`;
a command takes the ones it needs with :func:`add_sampling_option` and replaces only what its
meaning changes (``distill --grid`` is the student's grid and defaults to ``uniform``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "GRID_HELP",
    "RESIZE_HELP",
    "SAMPLING_OPTIONS",
    "HelpFormatter",
    "add_command",
    "add_config_args",
    "add_device",
    "add_no_ema",
    "add_no_progress",
    "add_run_source",
    "add_sampling_option",
    "add_vae_input",
    "training_exit_code",
]

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: the shell's code for a job ended by SIGTERM (schedulers requeue on it)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where the help text already says where it comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not quiet and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_command(subparsers, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command's parser, formatted like the top-level one."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------------------------
# Small argument groups
# ----------------------------------------------------------------------------------------------

RESIZE_HELP = "square size images are resized/cropped to"


def add_config_args(p: argparse.ArgumentParser, config_help: str, overrides_help: str) -> None:
    """CONFIG and its dotted ``key=value`` overrides (train, finetune-vae, info)."""
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def add_run_source(p: argparse.ArgumentParser) -> None:
    """The trained run to load: a run directory or one checkpoint file (sample, eval nll)."""
    p.add_argument("checkpoint", help="run directory (uses checkpoints/latest.pt), checkpoint file, "
                                      "exported folder (flowmatch export) or hf://OWNER/NAME[@REVISION]")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_no_progress(p: argparse.ArgumentParser,
                    help: str = "no progress bar (on a terminal) or progress lines every "
                                "$FLOWMATCH_PROGRESS_INTERVAL s, default 30 (in logs)") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def add_no_ema(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights")


def add_vae_input(p: argparse.ArgumentParser, vae_help: str, images_group=None) -> None:
    """The VAE to load and the image folder to run it on (encode-latents, recon); ``--images``
    joins ``images_group`` (a required mutually exclusive group) when given, else is required."""
    p.add_argument("--vae", required=True, help=vae_help)
    p.add_argument("--vae-subfolder", default=None, help="sub-folder of --vae holding the VAE")
    (images_group or p).add_argument("--images", required=images_group is None, help="image folder")


# ----------------------------------------------------------------------------------------------
# Sampling options
# ----------------------------------------------------------------------------------------------

GRID_HELP = "uniform | shifted | edm"

# flag -> the add_argument keywords every command shares (type, shape, default, generic help).
SAMPLING_OPTIONS: dict[str, dict[str, Any]] = {
    # help filled from the solver registry when a parser is built (see add_sampling_option)
    "--method": {"default": None, "help": None},
    "--steps": {"type": int, "default": None, "help": "solver steps"},
    "--nfe": {"type": int, "default": None,
              "help": "network evaluations per sample instead of --steps: steps = NFE / the "
                      "method's evaluations per step (an error if it does not divide)"},
    "--grid": {"default": None, "help": f"time grid: {GRID_HELP}"},
    "--grid-shift": {"type": float, "default": None, "help": "shift for --grid shifted"},
    "--diffusion": {"default": None,
                    "help": "euler_maruyama's diffusion coefficient w(t): constant | sigma | linear | "
                            "decreasing | increasing-decreasing | sbdm"},
    "--diffusion-norm": {"type": float, "default": None, "help": "scale of w(t)"},
    "--cfg-scale": {"type": float, "default": 1.0,
                    "help": "classifier-free guidance: v_null + w (v_cond - v_null); 1 = no guidance "
                            "(class-conditional models trained with label dropout)"},
    "--cfg-interval": {"type": float, "nargs": 2, "default": [0.0, 1.0], "metavar": ("T_LO", "T_HI"),
                       "help": "apply guidance only for t in [T_LO, T_HI] (default: 0 1, everywhere)"},
}


def add_sampling_option(p: argparse.ArgumentParser, flag: str, *, default_from: str | None = None,
                        **changes: Any) -> argparse.Action:
    """Adds the shared sampling option ``flag`` to ``p``.

    ``default_from`` names where a None default is filled in later (e.g. ``"the run's sample.steps"``)
    and is appended to the help as ``(default: ...)``; ``changes`` replace shared keywords where the
    command gives the option another meaning (help, default, required). An unknown keyword is a
    TypeError from argparse, not silently dropped.
    """
    kwargs = {**SAMPLING_OPTIONS[flag], **changes}
    if kwargs.get("help") is None and flag == "--method":
        from flowmatch.flow.solver_registry import methods_help  # torch: only once a parser is built

        kwargs["help"] = methods_help()
    if default_from is not None:
        kwargs["help"] = f"{kwargs['help']} (default: {default_from})"
    return p.add_argument(flag, **kwargs)


# ----------------------------------------------------------------------------------------------
# Exit codes of training jobs
# ----------------------------------------------------------------------------------------------


def training_exit_code(fit: Callable[[], str]) -> int:
    """Runs a training job and maps how it ended to the exit code.

    ``fit`` returns the job's status ("finished", "interrupted", "terminated"). A non-finite loss
    is one line on stderr and exit 1; a run stopped by Ctrl-C (its checkpoint written) exits 130,
    by SIGTERM 143. The process group, if any, is torn down either way.
    """
    from flowmatch import distributed
    from flowmatch.training import NonFiniteLossError

    try:
        status = fit()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        distributed.cleanup()
    return {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}.get(status, EXIT_OK)
