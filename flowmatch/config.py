"""Experiment configuration: a typed schema, YAML files, dotted command-line overrides.

This module is a leaf: the dataclasses below are the schema, a YAML file holds values and
``key.sub=value`` overrides patch it; it imports nothing else of flowmatch. Loading is strict: an
unknown key, a wrong type or an impossible plain value (``train.lr <= 0``) raises
:class:`ConfigError` whose one-line message names the dotted key -- before any work starts.

Four sections choose an implementation by name and take that implementation's own keyword
arguments *flat* next to the name::

    model: {arch: unet, base_channels: 64}          # -> flowmatch.models.MODEL_REGISTRY
    data:  {kind: digits, image_size: 16}            # -> flowmatch.data.DATASET_KINDS
    path:  {scheduler: linear, sigma_min: 0.0}       # -> flowmatch.flow.paths.SCHEDULERS
    train: {time_sampler: {name: logit_normal, mean: 0.0, std: 1.0, shift: 1.0},
            coupling: {name: sinkhorn, reg: 0.05, iters: 100}}    # -> flowmatch.flow.coupling.COUPLINGS

Here those extra keys are only collected, raw, into the section's ``params``: the names and the
arguments belong to the registries (:class:`flowmatch.registry.Registry`), and each checks its own
when a config is *resolved* -- :func:`flowmatch.components.resolve_config`, or
:func:`flowmatch.components.load_experiment` = :func:`load_config` + resolve, which is what a run
uses. Resolving fills in every default and type-checks the extra keys, so ``model.base_chanels=32``
fails naming ``model.base_chanels``; the resolved config is written to the run directory and stored
inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "CouplingConfig",
    "DataConfig",
    "ModelConfig",
    "PathConfig",
    "SampleConfig",
    "TimeSamplerConfig",
    "LogConfig",
    "MeanFlowConfig",
    "MeanFlowTimeConfig",
    "TrainConfig",
    "apply_overrides",
    "check_value",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_dataclass",
]


class ConfigError(ValueError):
    """A configuration mistake; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which data set to train on. Extra keys are the data set's own constructor arguments."""

    kind: str = "digits"  # a name in flowmatch.data.DATASET_KINDS: toy2d | digits | folder | latents | pairs
    hflip: bool = False  # random horizontal flips, drawn per sample from the step's seed (images only)
    # Expected shape of one item, e.g. [4, 32, 32]; [] = whatever the data gives. When set, training
    # checks the data against it before starting, and `flowmatch info` needs no data on disk.
    shape: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    _tag = "kind"


@dataclass
class ModelConfig:
    """Which network to train. Extra keys are the network's config dataclass fields."""

    arch: str = "unet"  # a name in flowmatch.models.MODEL_REGISTRY: mlp | unet | dit
    class_cond: bool = False  # condition on the data set's labels (needs a labelled data set)
    params: dict = field(default_factory=dict)

    _tag = "arch"


@dataclass
class PathConfig:
    """The probability path x_t = alpha_t x1 + sigma_t x0. Extra keys go to the scheduler."""

    scheduler: str = "linear"  # a name in flowmatch.flow.paths.SCHEDULERS: linear | cosine | vp
    params: dict = field(default_factory=dict)

    _tag = "scheduler"


@dataclass
class TimeSamplerConfig:
    """Distribution of training times t. Extra keys go to the sampler (e.g. mean, std)."""

    name: str = "uniform"  # a name in flowmatch.flow.time_samplers.TIME_SAMPLERS: uniform | logit_normal
    shift: float = 1.0  # > 1 spends more training time near noise (t -> t / (s - (s-1) t))
    params: dict = field(default_factory=dict)

    _tag = "name"


@dataclass
class CouplingConfig:
    """How noise is paired with data in a batch (minibatch OT, "OT-CFM"). Extra keys go to the method.

    none: independent pairs. exact: the optimal permutation (scipy, CPU). sinkhorn: entropic OT on
    the training device (reg: relative to the mean pair cost; iters: the most iterations) rounded to
    a permutation. Class-conditional models are coupled within each class. See flowmatch.flow.coupling.
    """

    name: str = "none"  # a name in flowmatch.flow.coupling.COUPLINGS: none | exact | sinkhorn
    params: dict = field(default_factory=dict)

    _tag = "name"


@dataclass
class MeanFlowTimeConfig(TimeSamplerConfig):
    """The sampler of the two times of ``train.objective: meanflow`` (same keys as ``time_sampler``).

    Default: the paper's ImageNet logit-normal, written in our time (t = 0 noise). The paper's time
    runs the other way (its t = 1 is noise): its ``logit_normal(-0.4, 1.0)`` is ours with
    ``mean: 0.4`` (``1 - sigmoid(m + s z) = sigmoid(-m + s z')``); its CIFAR-10 ``(-2.0, 2.0)`` is
    ``mean: 2.0, std: 2.0``. A partial override (``...time_sampler.std=2.0``) keeps the other default.
    """

    name: str = "logit_normal"
    params: dict = field(default_factory=lambda: {"mean": 0.4, "std": 1.0})


@dataclass
class MeanFlowConfig:
    """Settings of ``train.objective: meanflow`` (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for
    One-step Generative Modeling"; see :class:`flowmatch.training.objectives.MeanFlow`).

    The network learns the average velocity ``u(z_t, t, r)`` over ``[t, r]`` from the identity
    ``u = v + (r - t) du/dt`` (one forward-mode JVP for the stop-gradient target). Defaults are the
    paper's ImageNet ablation defaults (its Table 1); its CIFAR-10 run used ``equal_fraction 0.75``,
    ``adaptive_power 0.75`` and the sampler ``mean: 2.0, std: 2.0``. Needs ``model.two_time: true``.
    """

    # share of rows with r = t (plain flow matching on those rows); the paper: 75 % (25 % have r != t)
    equal_fraction: float = 0.75
    # the two times of a row: two draws, sorted so that t <= r (see MeanFlowTimeConfig)
    time_sampler: MeanFlowTimeConfig = field(default_factory=MeanFlowTimeConfig)
    # p of the adaptive loss weight w = 1 / (||u_theta - u_tgt||^2 + eps)^p (paper: 1.0; 0 = plain MSE)
    adaptive_power: float = 1.0
    # eps (the paper's c, 1e-3) of that weight; here ||.||^2 is the per-element mean, not the sum
    adaptive_eps: float = 1.0e-3
    # classifier-free guidance folded into the target (class-conditional models; needs
    # train.label_dropout > 0): v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null),
    # effective guidance scale omega / (1 - kappa). omega = 1, kappa = 0: no guidance.
    cfg_scale: float = 1.0  # omega
    cfg_mix: float = 0.0  # kappa, in [0, 1)
    # a curriculum (not in the paper; 0 = off): over the first N optimizer steps the jump r - t of
    # every row is scaled by (step + 1) / N, so training starts near the instantaneous velocity
    # (r ~ t) and reaches the drawn intervals at step N; deterministic in the step (resume is exact)
    interval_warmup_steps: int = 0


@dataclass
class LogConfig:
    """Where training metrics go besides metrics.jsonl and loss.png (always written)."""

    tensorboard: bool = False  # also TensorBoard event files in RUN_DIR/tensorboard (extra: tensorboard)


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 128  # samples per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant (both after a linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # per optimizer step; ignored when ema_halflife_images is set
    ema_halflife_images: int = 0  # > 0: EMA half-life counted in training images (EDM style)
    ema_start_step: int = 0  # the EMA copies the weights until this step, then averages
    label_dropout: float = 0.0  # probability of training a sample with the null class (for guidance)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA when supported, off on CPU) | no | bf16 | fp16
    time_sampler: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)  # pairing of noise and data
    # flow: flow matching (on a pair store: the straight path between each stored noise and sample,
    # i.e. reflow); segments: regress the secants of a pair store's trajectories (distillation);
    # meanflow: the average velocity u(z_t, t, r), for 1- and 2-step sampling (settings: meanflow)
    objective: str = "flow"
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)  # objective meanflow only
    # objective flow only: weight of LightningDiT's velocity direction term, added to the MSE:
    # loss = mean ||v - u||^2 + cosine_weight * mean_i (1 - cos(v_i, u_i)), rows flattened; 0 = off
    cosine_weight: float = 0.0
    init_from: str = ""  # checkpoint / run dir whose EMA weights start a fresh run ("" = random init)
    log_every: int = 50  # steps between metric lines in metrics.jsonl
    sample_every: int = 500  # steps between EMA sample grids; 0 disables
    save_every: int = 500  # steps between writes of checkpoints/latest.pt; 0 = only at the end
    keep_every: int = 0  # steps between kept snapshots checkpoints/step_XXXXXXX.pt; 0 disables
    num_workers: int = 0  # DataLoader worker processes for data sets read from disk
    compile: bool = False  # torch.compile the network for training (same numbers, faster kernels)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class SampleConfig:
    """How samples are drawn (during training and by `flowmatch sample` unless overridden)."""

    # The solver: a name in flowmatch.flow.sampling.METHODS (ODE solvers, e.g. euler, heun, rk4,
    # dpm2m, dopri5, and the SDE sampler euler_maruyama); `flowmatch sample --help` lists them all.
    method: str = "heun"
    steps: int = 25  # solver steps (NFE = steps x evaluations per step)
    grid: str = "uniform"  # a name in flowmatch.flow.time_samplers.GRIDS: uniform | shifted | edm
    grid_shift: float = 1.0
    diffusion: str = "sigma"  # euler_maruyama only: w(t), a name in flowmatch.flow.sde.DIFFUSIONS
    diffusion_norm: float = 1.0  # euler_maruyama only: scale of w(t)
    n: int = 64  # samples in a grid
    use_ema: bool = True
    atol: float = 1e-5  # adaptive solvers only
    rtol: float = 1e-5
    compile: bool = False  # torch.compile the network for sampling


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    out_dir: str = ""  # run directory; default runs/<name>
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    path: PathConfig = field(default_factory=PathConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


# ----------------------------------------------------------------------------------------------
# Type checking
# ----------------------------------------------------------------------------------------------


def _type_name(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


class _NotFinite(ConfigError):
    """A float setting given as nan or +-inf."""


def _finite(key: str, value: float) -> float:
    """``value`` if it is a finite number. No setting of the schema or of a registry means
    anything by nan or +-inf (a learning rate of inf trains NaNs; a clip norm of nan disables
    nothing), so a non-finite float is refused wherever a float is declared; a field that ever
    wants "no limit" says so with its own value (``grad_clip: 0`` disables clipping)."""
    if not math.isfinite(value):
        raise _NotFinite(f"{key}: must be a finite number, got {value!r}")
    return value


def check_value(key: str, value: Any, ann: Any) -> Any:
    """``value`` checked against the annotation ``ann`` and returned (ints widen to float, lists
    to tuples, a YAML-1.1 string like "1e-4" to a float); raises :class:`ConfigError` naming ``key``.
    A float must be finite: nan and +-inf are refused (no setting means anything by them).

    The one type checker of the configuration: the schema here and every registry's arguments
    (:mod:`flowmatch.registry`) go through it."""
    if ann is Any or ann is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(key, value, a)
            except _NotFinite:  # the right type, an impossible value: say so, not "expected ..."
                raise
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(ann)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_ann = args[0] if args else Any
            items = [check_value(f"{key}[{i}]", v, item_ann) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or ann is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if ann is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if ann is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if ann is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; a number written that way is meant.
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(key, number)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _finite(key, float(value))
    if ann is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if ann in (Path,):
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return str(value)
    if isinstance(ann, type) and not isinstance(value, ann):
        raise ConfigError(f"{key}: expected {_type_name(ann)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# dict -> dataclasses
# ----------------------------------------------------------------------------------------------


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build the dataclass ``cls`` from a mapping, strictly.

    A tagged section (one with a ``_tag`` naming its choice key) keeps the keys that are not its
    fields, raw, in ``params``: they are the chosen implementation's, checked when the config is
    resolved (:func:`flowmatch.components.resolve_config`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    tag = getattr(cls, "_tag", None)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in raw.items():
        sub = f"{key}.{k}" if key else str(k)
        if k in names and k != "params":
            ann = hints[k]
            if dataclasses.is_dataclass(ann):
                kwargs[k] = _build(ann, v, sub)
            else:
                kwargs[k] = check_value(sub, v, ann)
        elif tag is not None:
            extra[k] = copy.deepcopy(v)
        else:
            valid = ", ".join(n for n in names)
            raise ConfigError(f"{sub}: unknown key (valid keys here: {valid})")
    obj = cls(**kwargs)
    if tag is not None:
        # a section that keeps its default choice keeps that choice's default arguments too
        default = cls()
        base = default.params if getattr(obj, tag) == getattr(default, tag) else {}
        obj.params = {**copy.deepcopy(base), **extra}
    return obj


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate_train(t: TrainConfig) -> None:
    """Plain values of the ``train`` section (its time sampler and coupling are the registries')."""
    for k in ("steps", "batch_size", "grad_accum", "log_every"):
        _need(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    for k in ("warmup_steps", "weight_decay", "ema_halflife_images", "ema_start_step",
              "sample_every", "save_every", "keep_every", "num_workers"):
        _need(getattr(t, k) >= 0, f"train.{k}", "must be >= 0")
    _need(t.lr > 0, "train.lr", "must be > 0")
    _need(t.lr_schedule in ("cosine", "constant"), "train.lr_schedule", "must be cosine or constant")
    _need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _need(all(0.0 <= b < 1.0 for b in t.betas), "train.betas", "each must be in [0, 1)")
    _need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
    _need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _need(0.0 <= t.label_dropout < 1.0, "train.label_dropout", "must be in [0, 1)")
    _need(t.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision",
          "must be auto, no, bf16 or fp16")
    _need(t.objective in ("flow", "segments", "meanflow"), "train.objective",
          f"unknown objective {t.objective!r} (valid: flow, segments, meanflow)")
    _need(t.cosine_weight >= 0, "train.cosine_weight", "must be >= 0 (0: off)")
    _need(t.cosine_weight == 0 or t.objective == "flow", "train.cosine_weight",
          f"the direction term applies to objective flow only, not {t.objective}; set it to 0")
    m = t.meanflow
    _need(0.0 <= m.equal_fraction <= 1.0, "train.meanflow.equal_fraction", "must be in [0, 1]")
    _need(m.adaptive_power >= 0, "train.meanflow.adaptive_power", "must be >= 0 (0: plain MSE)")
    _need(m.adaptive_eps > 0, "train.meanflow.adaptive_eps", "must be > 0")
    _need(m.cfg_scale > 0, "train.meanflow.cfg_scale", "must be > 0 (1: no guidance)")
    _need(0.0 <= m.cfg_mix < 1.0, "train.meanflow.cfg_mix", "must be in [0, 1)")
    _need(m.interval_warmup_steps >= 0, "train.meanflow.interval_warmup_steps", "must be >= 0 (0: off)")


def _validate_meanflow(cfg: Config) -> None:
    """``train.objective: meanflow`` with the rest of the config (``model.two_time`` is the model
    registry's: :func:`flowmatch.components.resolve_config` checks it)."""
    t, m = cfg.train, cfg.train.meanflow
    ts = t.time_sampler
    _need(ts.name == "uniform" and ts.shift == 1.0 and not ts.params, "train.time_sampler",
          "objective meanflow draws its times from train.meanflow.time_sampler; leave this one unset")
    if m.cfg_scale != 1.0 or m.cfg_mix != 0.0:
        key = "train.meanflow.cfg_scale" if m.cfg_scale != 1.0 else "train.meanflow.cfg_mix"
        _need(cfg.model.class_cond, key, "guidance needs model.class_cond: true")
        _need(t.label_dropout > 0, key, "guidance needs an unconditional model: set train.label_dropout > 0 "
              "(the paper: 0.1)")


def _validate(cfg: Config) -> None:
    """Values that type-check but cannot work, as far as the schema alone can tell.

    The names in the tagged sections and their arguments, and the sampler settings (method, grid,
    steps, diffusion), are checked by their owners when the config is resolved."""
    t, s = cfg.train, cfg.sample
    _need(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    _need(len(cfg.data.shape) in (0, 1, 3) and all(d >= 1 for d in cfg.data.shape), "data.shape",
          "must be [] (taken from the data), [D] for vectors or [C, H, W] for images")
    _validate_train(t)
    _need(s.grid_shift > 0, "sample.grid_shift", "must be > 0")
    _need(s.n >= 1, "sample.n", "must be >= 1")
    # Rules across sections that need only the names, not the registries behind them.
    if t.label_dropout > 0:
        _need(cfg.model.class_cond, "train.label_dropout", "needs model.class_cond: true")
    if t.objective == "segments":
        _need(cfg.data.kind == "pairs", "train.objective",
              "segments (distillation) trains on a pair store: data.kind must be pairs "
              "(made by `flowmatch distill`)")
    if t.objective == "meanflow":
        _validate_meanflow(cfg)
    if cfg.data.kind == "pairs":
        _need(t.coupling.name == "none", "train.coupling",
              "a pair store already fixes which noise goes with which sample; use coupling none")
        _need(not cfg.data.hflip, "data.hflip", "flips would break the stored noise -> sample pairs")


def config_from_dict(raw: dict) -> Config:
    """A :class:`Config` from a (YAML-shaped) mapping, checked strictly against the schema.

    Every fixed key, type and plain value is checked here; a tagged section's extra keys stay raw
    in its ``params``. :func:`flowmatch.components.experiment_from_dict` also resolves them."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# dataclasses -> dict, YAML, overrides
# ----------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict:
    """The YAML-shaped mapping of a config: tagged sections flat, tuples as lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "params":
            out.update({k: _plain(x) for k, x in v.items()})
        elif dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        else:
            out[f.name] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a mapping; returns a copy."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=500")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text)
    return raw


def _read_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if raw is None:
        # An empty file (or one of comments only) is a mistake -- a truncated copy, the wrong
        # file -- far more often than a wish for the defaults, which `{}` or no file at all give.
        raise ConfigError(f"config file {str(p)!r} is empty (write {{}} to mean all defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or start from defaults), apply overrides, check strictly
    against the schema (:func:`config_from_dict`). A run resolves it too:
    :func:`flowmatch.components.load_experiment`."""
    return config_from_dict(apply_overrides(_read_yaml(path), overrides or []))


def load_dataclass(cls: type, path: str | Path | None, overrides: list[str] | None = None):
    """Any schema dataclass (e.g. a VAE fine-tuning config) from YAML + overrides, strictly.

    Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key, exactly as for
    :class:`Config`; checks of impossible values are the caller's (``__post_init__`` is a good place,
    raising ``ConfigError``).
    """
    return _build(cls, apply_overrides(_read_yaml(path), overrides or []), "")


def dump_config(cfg: Config) -> str:
    """A config as YAML text; for a resolved config every default is filled in."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
