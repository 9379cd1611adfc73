"""``flowmatch export RUN --out DIR [--raw] [--push-to-hub OWNER/NAME]``: a run as a shareable folder.

Writes ``DIR/model.safetensors`` and ``DIR/config.json`` (:func:`flowmatch.export.export_run`); any
command that takes a run directory takes ``DIR`` (or ``hf://OWNER/NAME`` once pushed) as well.
"""

from __future__ import annotations

import argparse

from flowmatch.cli.common import EXIT_OK, add_command, add_run_source

__all__ = ["add_parser", "run"]

_DESCRIPTION = (
    "Export a trained run as a folder of plain files: model.safetensors (the EMA weights; --raw "
    "the training weights), config.json (the resolved config, data shape, classes and class names, "
    "training step, and for latent runs the VAE source and latent normalisation) and a README.md "
    "model card. No pickles: loading never runs code. `flowmatch sample DIR`, `eval nll DIR`, "
    "distillation teachers and train.init_from load the folder like a run directory. "
    "--push-to-hub uploads it to the Hugging Face Hub (pip install 'flowmatch[hub]'; log in with "
    "`hf auth login` or set HF_TOKEN); load it back anywhere as hf://OWNER/NAME[@REVISION].")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "export", help="export a run as safetensors + config.json (and push to the Hub)",
                    description=_DESCRIPTION)
    add_run_source(p)
    p.add_argument("--out", required=True, help="folder to write (created; a previous export there is replaced)")
    p.add_argument("--raw", action="store_true", help="export the raw training weights instead of the EMA copy")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="then upload the folder to this Hugging Face Hub model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--commit-message", default=None,
                   help="with --push-to-hub: the commit message (default: 'flowmatch export (step N)')")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from flowmatch.checkpoint import parse_hub_source
    from flowmatch.export import export_run, push_to_hub

    if args.push_to_hub:
        parse_hub_source(f"hf://{args.push_to_hub}")  # a malformed id fails before any work
    meta = export_run(args.checkpoint, args.out, raw=args.raw, repo_id=args.push_to_hub)
    print(f"exported the {meta['weights']} weights of step {meta['step']} to {args.out}")
    if args.push_to_hub:
        url = push_to_hub(args.out, args.push_to_hub, private=True if args.private else None,
                          commit_message=args.commit_message)
        print(f"pushed to {url}; load it with hf://{args.push_to_hub}")
    return EXIT_OK
