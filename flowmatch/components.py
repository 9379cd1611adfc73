"""The pieces a config names, checked and built: the resolved config, the network, the latent facts.

Above the registries (models, data, the flow math, the autoencoder), below the run object, the
training loop and evaluation: everything that turns a :class:`~flowmatch.config.Config` into
objects goes through here, so each rule (e.g. "an unconditional model gets 0 classes") is written
once.

A config from :func:`flowmatch.config.load_config` has passed the schema; :func:`resolve_config`
hands each tagged section to its registry (which checks its own arguments and fills in defaults)
and builds the cheap pieces once, so every mistake stops before any work starts, as one
:class:`~flowmatch.config.ConfigError` line naming the dotted key. :func:`load_experiment` does
both: it is what a run (the CLI, the trainer, benchmarks) loads a YAML file with.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from flowmatch.config import Config, ConfigError, config_from_dict, load_config
from flowmatch.data import DATASET_KINDS
from flowmatch.flow.coupling import COUPLINGS
from flowmatch.flow.paths import SCHEDULERS
from flowmatch.flow.sampling import resolve_settings
from flowmatch.flow.time_samplers import TIME_SAMPLERS, build_time_sampler
from flowmatch.models import MODEL_REGISTRY, build_model
from flowmatch.registry import Registry, config_errors

__all__ = [
    "REGISTRIES",
    "build_model_from_config",
    "experiment_from_dict",
    "latent_info",
    "load_autoencoder_for",
    "load_experiment",
    "resolve_config",
]

#: The registry behind each tagged config section; each knows its section ("train.coupling") and
#: the key that names the choice ("name").
REGISTRIES = (DATASET_KINDS, MODEL_REGISTRY, SCHEDULERS, TIME_SAMPLERS, COUPLINGS)


def _section(cfg: Config, dotted: str):
    """``cfg.train.coupling`` for ``"train.coupling"``."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


#: ``train.meanflow.time_sampler``: the time samplers of ``train.time_sampler``, its errors naming this section.
MEANFLOW_TIME = "train.meanflow.time_sampler"


def _resolve_meanflow(cfg: Config) -> None:
    """The meanflow section's time sampler resolved and built once; ``train.objective: meanflow``
    with a model that takes one time refused (its ``two_time`` is the model registry's field)."""
    ts = cfg.train.meanflow.time_sampler
    view = Registry(MEANFLOW_TIME, TIME_SAMPLERS.tag, dict(TIME_SAMPLERS))  # the current entries
    ts.params = view.resolve(ts.name, ts.params)
    with config_errors(MEANFLOW_TIME, [*ts.params, "shift"]):
        build_time_sampler(ts.name, shift=ts.shift, **ts.params)
    two_time = cfg.model.params.get("two_time", False)
    if cfg.train.objective == "meanflow" and not two_time:
        raise ConfigError("model.two_time: train.objective meanflow needs a model of two times "
                          "(set model.two_time: true)")
    if cfg.sample.method == "meanflow" and not two_time:  # would fail only at the first grid
        raise ConfigError("sample.method: meanflow jumps need a model of two times trained with "
                          "train.objective: meanflow (model.two_time: true)")


def _check_pieces(cfg: Config) -> None:
    """Build what is cheap to build (no data, no network) once and drop it: the pieces' own
    constructors are the one place their values are checked (e.g. Sinkhorn's ``reg > 0``)."""
    MODEL_REGISTRY.build(cfg.model.arch, cfg.model.params)  # the architecture's config dataclass
    SCHEDULERS.build(cfg.path.scheduler, cfg.path.params)
    ts = cfg.train.time_sampler
    with config_errors(TIME_SAMPLERS.section, [*ts.params, "shift"]):
        build_time_sampler(ts.name, shift=ts.shift, **ts.params)
    COUPLINGS.build(cfg.train.coupling.name, cfg.train.coupling.params)
    try:
        resolve_settings(cfg.sample)
    except ValueError as e:  # "steps: must be >= 1" -> "sample.steps: must be >= 1"
        msg = str(e)
        raise ConfigError(f"sample.{msg}" if re.match(r"^\w+: ", msg) else f"sample: {msg}") from None


def resolve_config(cfg: Config) -> Config:
    """``cfg`` resolved: a copy whose tagged sections' ``params`` are checked by their registries
    with every default filled in, and whose pieces (model config, path, time sampler, coupling,
    sampler settings) have been built once to surface impossible values.

    Raises ConfigError naming the dotted key, before any work: the data is not opened and no
    network is built. Idempotent; ``cfg`` itself is not changed. A resolved config is what the run
    directory's ``config.yaml`` and every checkpoint store."""
    cfg = copy.deepcopy(cfg)
    for registry in REGISTRIES:
        section = _section(cfg, registry.section)
        section.params = registry.resolve(getattr(section, registry.tag), section.params)
    _resolve_meanflow(cfg)
    _check_pieces(cfg)
    return cfg


def experiment_from_dict(raw: dict) -> Config:
    """A resolved :class:`Config` from a (YAML-shaped) mapping, e.g. the one a checkpoint stores."""
    return resolve_config(config_from_dict(raw))


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """A YAML experiment file (or the defaults) with ``key=value`` overrides, checked against the
    schema and resolved by the registries: the config a run starts from."""
    return resolve_config(load_config(path, overrides))


def build_model_from_config(cfg: Config, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network a config describes, for data of ``data_shape`` with ``num_classes`` labels."""
    if cfg.model.class_cond and num_classes < 1:
        raise ConfigError("model.class_cond: the data set has no labels (num_classes is 0)")
    arch_cfg = MODEL_REGISTRY.build(cfg.model.arch, cfg.model.params)
    return build_model(cfg.model.arch, arch_cfg, tuple(data_shape),
                       num_classes if cfg.model.class_cond else 0)


def latent_info(dataset) -> dict | None:
    """What decoding a latent data set's samples needs: the VAE and the normalisation (or None)."""
    if getattr(dataset, "kind", "") == "pairs":  # a teacher's pairs: the teacher's latent space
        return dataset.latent
    if getattr(dataset, "kind", "") != "latent":
        return None
    return {"vae": dataset.vae_source, "normalization": dataset.normalization.to_dict(),
            "image_size": int(dataset.image_size)}


def load_autoencoder_for(latent: dict, device: str | torch.device = "cpu", vae: str | None = None):
    """The frozen VAE that decodes a latent model's samples, with the normalisation it was trained
    with (recorded in the checkpoint — never a different one). ``vae`` overrides where the VAE is
    loaded from (e.g. the folder moved), not how latents are scaled."""
    from flowmatch.autoencoder import Autoencoder, LatentNormalization

    norm = LatentNormalization.from_dict(latent["normalization"])
    return Autoencoder.load(vae or latent["vae"], normalization=norm, device=device)
