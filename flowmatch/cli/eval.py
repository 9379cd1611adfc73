"""``flowmatch eval fid|accuracy|nll``: FID of a sample folder, classifier accuracy, likelihood of data."""

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

__all__ = ["add_parser", "run"]

_FID_DESCRIPTION = (
    "Frechet distance between the features of a folder of samples and a reference (a folder of "
    "images, or a cached .npz of its statistics). Writes SAMPLES/fid_<extractor>.json with the "
    "exact settings (and the sampler's manifest when present).")
_ACCURACY_DESCRIPTION = (
    "Predicts the class of each sample of a folder written by 'flowmatch sample --out DIR' with a "
    "digit classifier and compares it with the class the sample was made for (the manifest's "
    "label, else index %% num_classes). Writes SAMPLES/classifier_digits.json.")
_NLL_DESCRIPTION = (
    "Integrates the flow backwards from each data point (t=1) to the noise (t=0) with the "
    "instantaneous change of variables, log p_1(x) = log N(x(0); 0, I) - int_0^1 div v dt. Prints "
    "one JSON line and writes it to RUN_DIR/nll.json (or --out). See "
    "flowmatch.evaluation.likelihood.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "eval", help="evaluate samples (FID, classifier accuracy) or likelihoods (NLL)")
    metrics = p.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    _add_fid(metrics)
    _add_accuracy(metrics)
    _add_nll(metrics)
    p.set_defaults(handler=run)
    return p


def _add_fid(metrics) -> None:
    p = add_command(metrics, "fid",
                    help="FID (+ precision/recall) of a sample folder against reference images or stats",
                    description=_FID_DESCRIPTION)
    p.add_argument("--samples", required=True, help="folder of sample PNGs")
    p.add_argument("--ref", required=True,
                   help="reference: an image folder, a .npz statistics file, or the built-in digits "
                        "(digits:train | digits:test | digits:all, at --image-size)")
    p.add_argument("--extractor", default="inception",
                   help="feature extractor: inception (needs torch-fidelity or pytorch-fid and its "
                        "weights) | digits (a small digit classifier, see --classifier)")
    p.add_argument("--classifier", default=None,
                   help="weights of the extractor; for digits, trained here first if the file does "
                        "not exist yet")
    p.add_argument("--image-size", type=int, default=299, help="images are resized to this square")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature batch")
    add_no_progress(p)
    add_device(p)


def _add_accuracy(metrics) -> None:
    p = add_command(metrics, "accuracy",
                    help="class-conditional check: a digit classifier's accuracy on samples",
                    description=_ACCURACY_DESCRIPTION)
    p.add_argument("--samples", required=True, help="folder of sample PNGs with its manifest.json")
    p.add_argument("--classifier", required=True,
                   help="digit classifier file (train_digit_classifier); trained here first if "
                        "it does not exist yet")
    p.add_argument("--image-size", type=int, default=16, help="images are read at this square size")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    add_device(p)


def _add_nll(metrics) -> None:
    p = add_command(metrics, "nll",
                    help="negative log-likelihood (nats, bits/dim) of data under a trained flow",
                    description=_NLL_DESCRIPTION)
    add_run_source(p)
    p.add_argument("-n", "--n", type=int, default=512, help="number of data items (a seeded random subset)")
    p.add_argument("--split", default=None,
                   help="data split, e.g. test (digits); default: the run's data set as trained")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="replace one of the run's data parameters, e.g. --data seed=1 "
                        "(repeatable; default: none)")
    p.add_argument("--divergence", default="auto",
                   help="exact (one backward pass per dimension) | hutchinson (one per probe) | "
                        "auto (exact when the data has <= 16 dimensions)")
    p.add_argument("--probe", default="rademacher", help="Hutchinson probe: rademacher | gaussian")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample, averaged")
    add_sampling_option(p, "--method",
                        help="ODE solver (default: dopri5 if torchdiffeq is installed, else rk4; rk4 "
                             "when --steps is given)")
    add_sampling_option(p, "--steps", help="steps of a fixed-step method (default: 32)")
    p.add_argument("--atol", type=float, default=1e-5, help="adaptive solver absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver relative tolerance")
    p.add_argument("--batch-size", type=int, default=256, help="items per batch")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the subset, and item i's dequantisation noise and probes by (seed, i)")
    p.add_argument("--dequantize", default="auto",
                   help="auto (8bit for image data on the 8-bit grid, none otherwise) | none "
                        "(continuous density of the stored values) | 8bit (uniform "
                        "dequantisation, bits/dim of the discrete pixels)")
    p.add_argument("--allow-approximate-prior", action="store_true",
                   help="paths whose t=0 marginal is not N(0, I) (VP): score x(0) under "
                        "N(0, sigma_0^2 I), an approximation")
    add_no_ema(p)
    p.add_argument("--out", default=None, help="JSON file to write (default: RUN_DIR/nll.json)")
    add_no_progress(p)
    add_device(p)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import json

    from flowmatch import distributed
    from flowmatch.config import ConfigError
    from flowmatch.evaluation.fid import eval_fid_main, train_digit_classifier

    _, device = distributed.init(args.device)
    try:
        if args.eval_command == "nll":
            return _eval_nll(args, device)
        if args.eval_command == "accuracy" or args.extractor == "digits":
            if args.classifier is None:
                raise ConfigError("--classifier: the digits extractor needs a weights file (it is "
                                  "trained there on the digits train split if it does not exist yet)")
            if not Path(args.classifier).exists():
                if distributed.is_main():  # one rank trains; the others wait for the file
                    info = train_digit_classifier(args.classifier, image_size=args.image_size)
                    print(f"trained the digit classifier: test accuracy "
                          f"{info['test_accuracy']:.4f} -> {args.classifier}")
                distributed.barrier()
        if args.eval_command == "accuracy":
            from flowmatch.evaluation.classify import classifier_accuracy

            res = classifier_accuracy(args.samples, args.classifier, args.image_size,
                                      batch_size=args.batch_size, device=device,
                                      write_json=distributed.is_main())
            distributed.print0(json.dumps({k: res[k] for k in ("accuracy", "n", "per_class")}))
            return EXIT_OK
        res = eval_fid_main(args.samples, args.ref, args.extractor, args.image_size,
                            classifier=args.classifier, batch_size=args.batch_size, device=device,
                            progress=not args.no_progress)
        distributed.print0(json.dumps({k: res[k] for k in ("fid", "precision", "recall", "n_samples",
                                                           "n_reference", "extractor") if k in res}))
        return EXIT_OK
    finally:
        distributed.cleanup()


def _eval_nll(args: argparse.Namespace, device) -> int:
    import json

    import yaml

    from flowmatch import distributed
    from flowmatch.atomic import atomic_write_json
    from flowmatch.checkpoint import find_checkpoint
    from flowmatch.config import ConfigError
    from flowmatch.evaluation.nll import evaluate_nll

    data_params = {"split": args.split} if args.split is not None else {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--data: expected KEY=VALUE, got {item!r}")
        data_params[key] = yaml.safe_load(value)
    res = evaluate_nll(args.checkpoint, n=args.n, data_params=data_params, divergence=args.divergence,
                       probe=args.probe, n_probes=args.probes, method=args.method, steps=args.steps,
                       atol=args.atol, rtol=args.rtol, batch_size=args.batch_size, seed=args.seed,
                       use_ema=not args.no_ema, device=device, dequantize_mode=args.dequantize,
                       allow_approximate_prior=args.allow_approximate_prior,
                       progress=not args.no_progress and distributed.is_main())
    file = find_checkpoint(args.checkpoint)
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    out = Path(args.out) if args.out else run_dir / "nll.json"
    distributed.print0(json.dumps(res))  # first: a run directory we cannot write to loses nothing
    if distributed.is_main():
        atomic_write_json(out, res)
    return EXIT_OK
