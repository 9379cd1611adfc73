"""Experiment configuration: a typed schema, YAML files, dotted command-line overrides.

The dataclasses below are the schema; a YAML file holds values; ``key.sub=value`` overrides patch it.
Every value is checked against its annotation, and an unknown key, a wrong type or an impossible
value raises :class:`ConfigError` whose message names the dotted key -- before any work starts.

Four sections choose an implementation by name from a registry and take that implementation's own
keyword arguments *flat* next to the name::

    model: {arch: unet, base_channels: 64}          # -> flowmatch.models.MODEL_REGISTRY
    data:  {kind: digits, image_size: 16}            # -> flowmatch.data.DATASET_KINDS
    path:  {scheduler: linear, sigma_min: 0.0}       # -> flowmatch.flow.paths.SCHEDULERS
    train: {time_sampler: {name: logit_normal, mean: 0.0, std: 1.0, shift: 1.0},
            coupling: {name: sinkhorn, reg: 0.05, iters: 100}}    # -> flowmatch.flow.coupling.COUPLINGS

Those extra keys are validated against the chosen implementation's signature (or its config
dataclass), so ``model.base_chanels=32`` fails naming ``model.base_chanels``. The resolved config
(all defaults filled in) is written to the run directory and stored inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "PathConfig",
    "TimeSamplerConfig",
    "CouplingConfig",
    "TrainConfig",
    "SampleConfig",
    "load_config",
    "load_dataclass",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dump_config",
]


class ConfigError(ValueError):
    """A configuration mistake; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which data set to train on. Extra keys are the data set's own constructor arguments."""

    kind: str = "digits"  # toy2d | digits | folder | (latent stores come later)
    hflip: bool = False  # random horizontal flips, drawn per sample from the step's seed (images only)
    # Expected shape of one item, e.g. [4, 32, 32]; [] = whatever the data gives. When set, training
    # checks the data against it before starting, and `flowmatch info` needs no data on disk.
    shape: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    _tag = "kind"


@dataclass
class ModelConfig:
    """Which network to train. Extra keys are the network's config dataclass fields."""

    arch: str = "unet"  # mlp | unet
    class_cond: bool = False  # condition on the data set's labels (needs a labelled data set)
    params: dict = field(default_factory=dict)

    _tag = "arch"


@dataclass
class PathConfig:
    """The probability path x_t = alpha_t x1 + sigma_t x0. Extra keys go to the scheduler."""

    scheduler: str = "linear"  # linear | cosine | vp
    params: dict = field(default_factory=dict)

    _tag = "scheduler"


@dataclass
class TimeSamplerConfig:
    """Distribution of training times t. Extra keys go to the sampler (e.g. mean, std)."""

    name: str = "uniform"  # uniform | logit_normal
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

    name: str = "none"  # none | exact | sinkhorn
    params: dict = field(default_factory=dict)

    _tag = "name"


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
    # i.e. reflow); segments: regress the secants of a pair store's trajectories (distillation)
    objective: str = "flow"
    init_from: str = ""  # checkpoint / run dir whose EMA weights start a fresh run ("" = random init)
    log_every: int = 50  # steps between metric lines in metrics.jsonl
    sample_every: int = 500  # steps between EMA sample grids; 0 disables
    save_every: int = 500  # steps between writes of checkpoints/latest.pt; 0 = only at the end
    keep_every: int = 0  # steps between kept snapshots checkpoints/step_XXXXXXX.pt; 0 disables
    num_workers: int = 0  # DataLoader worker processes for data sets read from disk


@dataclass
class SampleConfig:
    """How samples are drawn (during training and by `flowmatch sample` unless overridden)."""

    # ODE: euler | midpoint | heun | rk4 | ab2 | dpm2m | dopri5 | bosh3 | ... ; SDE: euler_maruyama
    # (flowmatch.flow.sampling.METHODS)
    method: str = "heun"
    steps: int = 25  # solver steps (NFE = steps x evaluations per step)
    grid: str = "uniform"  # uniform | shifted | edm
    grid_shift: float = 1.0
    diffusion: str = "sigma"  # euler_maruyama only: w(t), see flowmatch.flow.sde.DIFFUSIONS
    diffusion_norm: float = 1.0  # euler_maruyama only: scale of w(t)
    n: int = 64  # samples in a grid
    use_ema: bool = True
    atol: float = 1e-5  # adaptive solvers only
    rtol: float = 1e-5


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
# Registries behind the tagged sections (imported lazily: config stays cheap to import)
# ----------------------------------------------------------------------------------------------

# Constructor arguments the trainer sets itself, so the config must not offer them.
_HIDDEN_PARAMS = {"data": {"random_flip", "self", "split_seed"}}


def _registry(section: str) -> dict[str, Any]:
    if section == "model":
        from flowmatch.models import MODEL_REGISTRY

        return {name: cfg_cls for name, (cfg_cls, _) in MODEL_REGISTRY.items()}
    if section == "data":
        from flowmatch.data import DATASET_KINDS

        return dict(DATASET_KINDS)
    if section == "path":
        from flowmatch.flow.paths import SCHEDULERS

        return dict(SCHEDULERS)
    if section == "train.time_sampler":
        from flowmatch.flow.time_samplers import TIME_SAMPLERS

        return dict(TIME_SAMPLERS)
    if section == "train.coupling":
        from flowmatch.flow.coupling import COUPLINGS

        return dict(COUPLINGS)
    raise KeyError(section)


_MISSING = object()


def _params_schema(target: Any, hidden: set[str]) -> dict[str, tuple[Any, Any]]:
    """{name: (annotation, default)} of a dataclass's fields or a callable's keyword arguments."""
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    if dataclasses.is_dataclass(target):
        out = {}
        for f in dataclasses.fields(target):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = _MISSING
            out[f.name] = (hints.get(f.name, Any), default)
        return out
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name in hidden or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = _MISSING if p.default is p.empty else p.default
        out[name] = (hints.get(name, Any), default)
    return out


# ----------------------------------------------------------------------------------------------
# Type checking
# ----------------------------------------------------------------------------------------------


def _type_name(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _coerce(key: str, value: Any, ann: Any) -> Any:
    """Check ``value`` against the annotation ``ann``; return it (ints widen to float, lists to tuples)."""
    if ann is Any or ann is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
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
            items = [_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_ann = args[0] if args else Any
            items = [_coerce(f"{key}[{i}]", v, item_ann) for i, v in enumerate(value)]
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
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
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
    """Build the dataclass ``cls`` from a mapping, strictly."""
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
                kwargs[k] = _coerce(sub, v, ann)
        elif tag is not None:
            extra[k] = v
        else:
            valid = ", ".join(n for n in names)
            raise ConfigError(f"{sub}: unknown key (valid keys here: {valid})")
    for k in names:  # sections left out still get their (tagged) defaults resolved
        if k not in kwargs and dataclasses.is_dataclass(hints.get(k)):
            kwargs[k] = _build(hints[k], {}, f"{key}.{k}" if key else k)
    obj = cls(**kwargs)
    if tag is not None:
        obj.params = _build_params(key, tag, getattr(obj, tag), extra)
    return obj


def _build_params(section: str, tag: str, choice: str, extra: dict[str, Any]) -> dict[str, Any]:
    registry = _registry(section)
    if choice not in registry:
        raise ConfigError(
            f"{section}.{tag}: unknown value {choice!r} (valid: {', '.join(sorted(registry))})"
        )
    schema = _params_schema(registry[choice], _HIDDEN_PARAMS.get(section, set()))
    params = {}
    for k, v in extra.items():
        if k not in schema:
            valid = ", ".join(sorted(schema)) or "none"
            raise ConfigError(
                f"{section}.{k}: unknown key for {tag} {choice!r} (valid: {valid})"
            )
        params[k] = _coerce(f"{section}.{k}", v, schema[k][0])
    for k, (_, default) in schema.items():
        if k not in params:
            if default is _MISSING:
                raise ConfigError(f"{section}.{k}: required for {tag} {choice!r}")
            params[k] = default
    return params


def _validate(cfg: Config) -> None:
    """Values that type-check but cannot work."""
    t, s = cfg.train, cfg.sample

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.lr_schedule in ("cosine", "constant"), "train.lr_schedule", "must be cosine or constant")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(all(0.0 <= b < 1.0 for b in t.betas), "train.betas", "each must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    need(t.ema_halflife_images >= 0, "train.ema_halflife_images", "must be >= 0")
    need(0.0 <= t.label_dropout < 1.0, "train.label_dropout", "must be in [0, 1)")
    need(
        t.mixed_precision in ("auto", "no", "bf16", "fp16"),
        "train.mixed_precision",
        "must be auto, no, bf16 or fp16",
    )
    need(t.time_sampler.shift > 0, "train.time_sampler.shift", "must be > 0")
    for k in ("log_every", "sample_every", "save_every", "keep_every", "num_workers", "ema_start_step"):
        need(getattr(t, k) >= 0, f"train.{k}", "must be >= 0")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    from flowmatch.flow.sampling import METHODS
    from flowmatch.flow.sde import DIFFUSIONS
    from flowmatch.flow.time_samplers import GRIDS

    need(s.method in METHODS, "sample.method", f"unknown solver {s.method!r} (valid: {', '.join(METHODS)})")
    need(s.diffusion in DIFFUSIONS, "sample.diffusion",
         f"unknown diffusion {s.diffusion!r} (valid: {', '.join(DIFFUSIONS)})")
    need(s.diffusion_norm >= 0, "sample.diffusion_norm", "must be >= 0")
    need(t.objective in ("flow", "segments"), "train.objective",
         f"unknown objective {t.objective!r} (valid: flow, segments)")
    if t.objective == "segments":
        need(cfg.data.kind == "pairs", "train.objective",
             "segments (distillation) trains on a pair store: data.kind must be pairs "
             "(made by `flowmatch distill`)")
    if cfg.data.kind == "pairs":
        need(t.coupling.name == "none", "train.coupling",
             "a pair store already fixes which noise goes with which sample; use coupling none")
        need(not cfg.data.hflip, "data.hflip", "flips would break the stored noise -> sample pairs")
    need(s.steps >= 1, "sample.steps", "must be >= 1")
    need(s.grid in GRIDS, "sample.grid", f"unknown grid {s.grid!r} (valid: {', '.join(GRIDS)})")
    need(s.grid_shift > 0, "sample.grid_shift", "must be > 0")
    need(s.grid == "shifted" or s.grid_shift == 1.0, "sample.grid_shift",
         f"only used with sample.grid: shifted (grid is {s.grid!r})")
    need(s.n >= 1, "sample.n", "must be >= 1")
    need(s.atol > 0 and s.rtol > 0, "sample.atol", "atol and rtol must be > 0")
    if t.label_dropout > 0:
        need(cfg.model.class_cond, "train.label_dropout", "needs model.class_cond: true")
    # Constructing the pieces surfaces impossible combinations (e.g. a bad sigma_min) now.
    cfg_cls = _registry("model")[cfg.model.arch]
    try:
        cfg_cls(**cfg.model.params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    need(len(cfg.data.shape) in (0, 1, 3) and all(d >= 1 for d in cfg.data.shape), "data.shape",
         "must be [] (taken from the data), [D] for vectors or [C, H, W] for images")
    from flowmatch.flow.paths import build_path
    from flowmatch.flow.time_samplers import build_time_sampler

    try:
        build_path(cfg.path.scheduler, **cfg.path.params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"path: {e}") from None
    try:
        build_time_sampler(t.time_sampler.name, shift=t.time_sampler.shift, **t.time_sampler.params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train.time_sampler: {e}") from None
    cp = t.coupling.params
    if "reg" in cp:
        need(cp["reg"] > 0, "train.coupling.reg", "must be > 0 (a fraction of the mean pair cost)")
    if "iters" in cp:
        need(cp["iters"] >= 1, "train.coupling.iters", "must be >= 1")
    if "tol" in cp:
        need(cp["tol"] > 0, "train.coupling.tol", "must be > 0")
    from flowmatch.flow.coupling import build_coupling

    try:
        build_coupling(t.coupling.name, **cp)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train.coupling: {e}") from None


def config_from_dict(raw: dict) -> Config:
    """A validated :class:`Config` from a (YAML-shaped) mapping."""
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
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or start from defaults), apply overrides, validate."""
    return config_from_dict(apply_overrides(_read_yaml(path), overrides or []))


def load_dataclass(cls: type, path: str | Path | None, overrides: list[str] | None = None):
    """Any schema dataclass (e.g. a VAE fine-tuning config) from YAML + overrides, strictly.

    Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key, exactly as for
    :class:`Config`; checks of impossible values are the caller's (``__post_init__`` is a good place,
    raising ``ConfigError``).
    """
    return _build(cls, apply_overrides(_read_yaml(path), overrides or []), "")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (every default filled in)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
