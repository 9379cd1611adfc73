"""Thin entry point kept for users of the original scripts: `python scripts/train.py CONFIG [k=v ...]`.

Same as `flowmatch train CONFIG [k=v ...]`; works under `torchrun --nproc_per_node=N` too.
"""

import sys

from flowmatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
