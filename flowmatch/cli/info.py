"""``flowmatch info CONFIG [key=value ...]``: the model a config builds, with its exact parameter count."""

from __future__ import annotations

import argparse

from flowmatch.cli.common import EXIT_OK, add_command, add_config_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "info", help="summarise the model a config builds (exact parameter count)")
    add_config_args(p, "experiment YAML file", "dotted overrides")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from flowmatch.components import load_experiment
    from flowmatch.data import build_dataset
    from flowmatch.models import count_parameters
    from flowmatch.training import build_model_from_config

    cfg = load_experiment(args.config, args.overrides)
    if cfg.data.shape and not cfg.model.class_cond:
        # The config states the item shape: no need to open the data (it may not exist here).
        data_shape, num_classes = tuple(cfg.data.shape), 0
        data_line = f"{cfg.data.kind}, items of shape {data_shape} (from data.shape; data not read)"
    else:
        ds = build_dataset(cfg.data.kind, **cfg.data.params)
        data_shape, num_classes = tuple(ds.data_shape), int(ds.num_classes)
        data_line = f"{cfg.data.kind}, {len(ds)} items of shape {data_shape}, {num_classes} classes"
    model = build_model_from_config(cfg, data_shape, num_classes)
    total = count_parameters(model)
    print(f"experiment: {cfg.name}")
    print(f"data:       {data_line}")
    print(f"model:      {cfg.model.arch} {cfg.model.params}")
    print(f"path:       {cfg.path.scheduler} {cfg.path.params}")
    print("parameters by top-level module:")
    for name, child in model.named_children():
        n = count_parameters(child)
        if n:
            print(f"  {name:<24} {n:>14,}")
    direct = sum(p.numel() for p in model.parameters(recurse=False) if p.requires_grad)
    if direct:
        print(f"  {'(own parameters)':<24} {direct:>14,}")
    print(f"trainable parameters: {total:,} ({total / 1e6:.2f}M)")
    return EXIT_OK
