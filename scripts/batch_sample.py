"""Thin entry point kept for users of the original scripts: sample an image set into a folder.

    python scripts/batch_sample.py RUN_DIR_OR_CHECKPOINT_OR_CONFIG [--n N] [--out DIR] [...]
    torchrun --nproc_per_node=2 scripts/batch_sample.py configs/digits_unet.yaml -n 64 --out samples/

Under torchrun write ``-n 64`` (or put ``--`` before the options): torchrun parses the whole
command line first and rejects ``--n`` as an ambiguous abbreviation of its own ``--nnodes`` /
``--nproc-per-node``.

Same as `flowmatch sample SOURCE --out DIR ...` (see `flowmatch sample --help` for every option),
except that SOURCE may also be a YAML config, whose run directory (``out_dir``, default
runs/<name>) is then sampled, and that --out defaults to the folder ``samples``.
"""

import sys
from pathlib import Path

from flowmatch.cli import EXIT_BAD_INPUT, main


def _resolve_source(source: str) -> str:
    """A config file -> its run directory (which must hold a checkpoint); anything else as is."""
    if Path(source).suffix not in (".yaml", ".yml"):
        return source
    from flowmatch.config import load_config
    from flowmatch.training import CheckpointError, find_checkpoint

    run_dir = load_config(source).run_dir
    try:
        find_checkpoint(run_dir)
    except CheckpointError:
        raise CheckpointError(f"no checkpoint in its run directory {str(run_dir)!r} (looked for "
                              f"checkpoints/latest.pt)") from None
    return str(run_dir)


def run(argv: list[str]) -> int:
    from flowmatch.config import ConfigError
    from flowmatch.distributed import is_main
    from flowmatch.training import CheckpointError

    if not argv or argv[0].startswith("-"):
        return main(["sample", *argv])  # --help, or argparse's own message for a missing SOURCE
    source, rest = argv[0], argv[1:]
    if "--" in rest:  # `torchrun ... batch_sample.py CONFIG -- --n 64`: the separator is torchrun's
        rest.remove("--")
    try:
        checkpoint = _resolve_source(source)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        if is_main():  # every rank fails alike; one message is enough
            hint = f"; train first: flowmatch train {source}" if isinstance(e, CheckpointError) else ""
            print(f"error: {source}: {e}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest = [*rest, "--out", "samples"]
    return main(["sample", checkpoint, *rest])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
