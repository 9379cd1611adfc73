"""Latent store read speed on CPU: random access through ``LatentStore``, batched and per item.

    python benchmarks/store_speed.py [--n 60000] [--batch-size 256] [--epochs 3] [--single 20000]
        [--threads 1] [--dtype float16] [--tmpdir DIR] [--json out.json]

Protocol (the defaults are the protocol):

1. Write a synthetic store of ``--n`` latents of shape 4 x 32 x 32 (what a 256 x 256 image gives
   through an SD-style VAE; 60,000 = CelebA-HQ's 30,000 images stored with their mirrors) in a
   temporary folder, in the ``flowmatch-latents-v1`` layout that ``LatentStore`` validates:
   ``latents.npy`` (N, 4, 32, 32) float16 and ``meta.json``. ``encode_to_store`` is not used: it
   needs a VAE and an image folder, and would measure the encoder rather than the store. The
   values are N(0, 1), so ``channel_mean`` 0 and ``channel_std`` 1 are their true statistics and
   the default ``"channel"`` normalisation does its usual work.
2. Read it back, page cache warm (the store was just written; a cold read is the disk's speed):
   (a) ``DataLoader``: ``batch_size`` 256, a seeded ``RandomSampler``, ``num_workers=0``; the
       loader calls ``LatentStore.__getitems__`` once per batch (one sorted fancy index into the
       memory map, then normalisation) and collates. This is the training read path.
   (b) ``__getitems__`` alone, on the same random batches (no ``DataLoader``, no collation), to show
       what collation costs.
   (c) ``__getitem__`` per item, on ``--single`` random indices: the path of a plain ``Dataset``
       loop.
   (a) and (b): one untimed epoch first (it maps every page into this process), then the median of
   ``--epochs`` timed epochs. Reported: latents/s, MB/s of stored data, ms per batch, and whether
   the target of 20,000 latents/s is met.

The temporary folder is removed at the end. ``main(argv)`` returns the results dictionary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_model  # benchmarks/_common.py
from torch.utils.data import DataLoader, RandomSampler

from flowmatch.data.latents import FORMAT, LatentStore, read_store_meta

COLUMNS = ("mode", "n", "batch", "threads", "latents/s", "MB/s", "ms/batch", "target")
#: Latents per second the store must sustain on one CPU thread (a training step on GPUs needs a
#: few hundred latents per step at a few steps per second; 20,000/s leaves a wide margin).
TARGET_LATENTS_PER_S = 20_000
LATENT_SHAPE = (4, 32, 32)
#: Items generated per chunk when writing the synthetic store (bounds the writer's memory).
WRITE_CHUNK = 4096


#################################################################################
#                              The synthetic store                              #
#################################################################################


def write_synthetic_store(folder: Path, n: int, shape=LATENT_SHAPE, dtype: str = "float16",
                          seed: int = 0) -> Path:
    """Write ``n`` N(0, 1) latents as a complete ``flowmatch-latents-v1`` store in ``folder``.

    ``latents.npy`` is written through ``np.lib.format.open_memmap`` in chunks (the array may not
    fit in memory at once); ``meta.json`` carries every field ``LatentStore`` reads, with values
    that say the store is synthetic. Returns ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    latents = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.dtype(dtype),
                                        shape=(n, *shape))
    per_item = int(np.prod(shape))
    for start in range(0, n, WRITE_CHUNK):
        rows = min(WRITE_CHUNK, n - start)
        chunk = rng.standard_normal(rows * per_item, dtype=np.float32).reshape(rows, *shape)
        latents[start:start + rows] = chunk.astype(dtype)
    latents.flush()
    del latents
    channels = shape[0]
    meta = {
        "format": FORMAT, "count": n, "shape": list(shape), "dtype": dtype,
        "vae": "synthetic (benchmarks/store_speed.py)",
        # Raw latents are N(0, 1) already: the identity "scaling" map and unit channel statistics.
        "vae_scaling_factor": 1.0, "vae_shift_factor": 0.0,
        "image_size": 8 * shape[-1], "center_crop": True, "flip": False,
        "channel_mean": [0.0] * channels, "channel_std": [1.0] * channels,
        "classes": [], "has_std": False, "complete": True, "written": n,
        "sources_digest": "",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    read_store_meta(folder)  # the format check the reader does, so a mistake here fails early
    return folder


#################################################################################
#                                   Readers                                     #
#################################################################################


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of random index batches, as the DataLoader's ``RandomSampler`` would draw them."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def time_loader_epoch(store: LatentStore, batch_size: int, seed: int) -> tuple[float, int, int]:
    """One epoch through a ``DataLoader`` (random sampler, main process): (seconds, items, batches)."""
    sampler = RandomSampler(store, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(store, batch_size=batch_size, sampler=sampler, num_workers=0)
    items = batches = 0
    start = time.perf_counter()
    for x, y in loader:
        items += x.shape[0]
        batches += 1
    return time.perf_counter() - start, items, batches


def time_getitems_epoch(store: LatentStore, batch_size: int, seed: int) -> tuple[float, int, int]:
    """One epoch of ``store.__getitems__`` on random batches, without collation."""
    batches = random_batches(len(store), batch_size, seed)
    items = 0
    start = time.perf_counter()
    for idx in batches:
        items += len(store.__getitems__(idx))
    return time.perf_counter() - start, items, len(batches)


def time_getitem(store: LatentStore, count: int, seed: int) -> tuple[float, int, int]:
    """``count`` single reads ``store[i]`` at random indices: (seconds, items, calls)."""
    idx = torch.randint(len(store), (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    for i in idx[: max(1, count // 10)]:  # untimed: fault in some pages, warm the code path
        store[i]
    start = time.perf_counter()
    for i in idx:
        store[i]
    return time.perf_counter() - start, count, count


def make_row(mode: str, n: int, batch: int, threads: int, seconds: float, items: int, calls: int,
             bytes_per_item: int, extra: dict | None = None) -> dict:
    rate = items / seconds
    return {"mode": mode, "n": n, "batch": batch, "threads": threads, "latents_per_s": rate,
            "mb_per_s": rate * bytes_per_item / 1e6, "ms_per_batch": 1e3 * seconds / calls,
            "seconds": seconds, "items": items,
            "target_met": rate > TARGET_LATENTS_PER_S, **(extra or {})}


def format_table(rows: list[dict]) -> str:
    """Rows as plain text, aligned (numbers right-aligned)."""
    cells = [list(COLUMNS)]
    for r in rows:
        cells.append([r["mode"], str(r["n"]), str(r["batch"]), str(r["threads"]),
                      f"{r['latents_per_s']:,.0f}", f"{r['mb_per_s']:.1f}", f"{r['ms_per_batch']:.3f}",
                      f"> {TARGET_LATENTS_PER_S:,}: {'met' if r['target_met'] else 'MISSED'}"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i in (0, 7) else c[i].rjust(widths[i])
                       for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


#################################################################################
#                                     Main                                      #
#################################################################################


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60_000, help="latents in the store (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="DataLoader batch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3,
                   help="timed epochs for the batched reads; the median is reported (default: %(default)s)")
    p.add_argument("--single", type=int, default=20_000,
                   help="random single-item reads timed for __getitem__ (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; a DataLoader worker runs with 1 (default: %(default)s)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored dtype (default: %(default)s)")
    p.add_argument("--normalization", choices=("channel", "scaling"), default="channel",
                   help="LatentStore normalisation (default: %(default)s)")
    p.add_argument("--tmpdir", default=None,
                   help="where to create the temporary store (default: the system temp folder)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all numbers here (default: none)")
    args = p.parse_args(argv)
    if min(args.n, args.batch_size, args.epochs, args.single, args.threads) < 1:
        p.error("--n, --batch-size, --epochs, --single and --threads must be >= 1")
    return args


def main(argv=None) -> dict:
    """Write the synthetic store, time the three read paths, print the table, clean up."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bytes_per_item = int(np.prod(LATENT_SHAPE)) * np.dtype(args.dtype).itemsize
    folder = Path(tempfile.mkdtemp(prefix="flowmatch-store-bench-", dir=args.tmpdir))
    rows = []
    try:
        start = time.perf_counter()
        write_synthetic_store(folder, args.n, dtype=args.dtype)
        write_s = time.perf_counter() - start
        print(f"wrote {args.n} latents {LATENT_SHAPE} {args.dtype} "
              f"({args.n * bytes_per_item / 1e6:.0f} MB) to {folder} in {write_s:.1f} s", flush=True)
        store = LatentStore(folder, normalization=args.normalization)

        for mode, epoch in (("DataLoader (__getitems__)", time_loader_epoch),
                            ("__getitems__ only", time_getitems_epoch)):
            epoch(store, args.batch_size, seed=0)  # untimed: maps every page into this process
            runs = [epoch(store, args.batch_size, seed=1 + k) for k in range(args.epochs)]
            seconds, items, calls = sorted(runs)[(len(runs) - 1) // 2]  # the (lower) median epoch
            rows.append(make_row(mode, args.n, args.batch_size, args.threads, seconds, items, calls,
                                 bytes_per_item, {"epoch_seconds": [r[0] for r in runs]}))
            print(f"  timed {mode}: {rows[-1]['latents_per_s']:,.0f} latents/s", flush=True)

        seconds, items, calls = time_getitem(store, args.single, seed=0)
        rows.append(make_row("__getitem__ per item", args.n, 1, args.threads, seconds, items, calls,
                             bytes_per_item))
        del store  # close the memory maps before the folder goes
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(format_table(rows))
    training = rows[0]
    print(f"\ntarget > {TARGET_LATENTS_PER_S:,} latents/s on the training read path (the DataLoader row): "
          f"{'met' if training['target_met'] else 'MISSED'}; page cache warm; "
          f"{torch.get_num_threads()} thread(s); {cpu_model()}; torch {torch.__version__}")
    results = {
        "columns": list(COLUMNS),
        "machine": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "args": vars(args),
        "latent_shape": list(LATENT_SHAPE),
        "bytes_per_latent": bytes_per_item,
        "write_seconds": write_s,
        "target_latents_per_s": TARGET_LATENTS_PER_S,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
