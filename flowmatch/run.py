"""A trained run, loaded once: the one place that turns "a run" into samples.

Loaded from a run directory, a checkpoint file, an exported folder or ``hf://`` (:meth:`Run.load`),
or assembled from a training loop's live objects (:class:`Run` itself), it owns

* the network (EMA weights by default) and the resolved :class:`~flowmatch.config.Config`,
* the probability path, the data shape (the latent shape for latent models), the classes,
* the label of sample ``i`` (:meth:`Run.labels`: ``label`` for all, else ``i % num_classes``),
* classifier-free guidance (:class:`Guidance`),
* latent decoding through the VAE recorded at training time (:meth:`Run.decode`),
* :meth:`Run.sample`: samples ``indices`` with noise seeded per index, so a set of samples does not
  depend on the batch size or on how many processes make it.

The CLI's ``sample``, batch sampling into folders, distillation pairs, the trainer's sample grids
and ``eval nll`` are short callers of this object. Time convention: ``t = 0`` is noise, ``t = 1``
is data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowmatch.checkpoint import (
    SAMPLE_KEYS,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
)
from flowmatch.components import (
    build_model_from_config,
    experiment_from_dict,
    load_autoencoder_for,
)
from flowmatch.config import Config, ConfigError
from flowmatch.flow.paths import AffinePath, build_path
from flowmatch.flow.sampling import (
    SampleSettings,
    check_two_time,
    generate_with_settings,
    resolve_settings,
    seeded_noise,
)

__all__ = ["NO_GUIDANCE", "Guidance", "Run", "SampleJob", "Samples", "SolverChoice", "known_fields", "model_from_checkpoint",
           "save_samples", "take_fields"]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ``scale`` w (1 = the plain conditional model) applied for times in
    ``interval``; see :class:`flowmatch.flow.guidance.ClassifierFreeGuidance`."""

    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    @classmethod
    def from_options(cls, options: dict) -> Guidance:
        """Guidance from the flat keywords ``cfg_scale`` / ``cfg_interval`` (removed from ``options``)."""
        return cls(float(options.pop("cfg_scale", 1.0)),
                   tuple(float(v) for v in options.pop("cfg_interval", (0.0, 1.0))))


def take_fields(options: dict, cls: type) -> dict:
    """Remove from ``options`` and return the keywords that are fields of the dataclass ``cls``."""
    return {k: options.pop(k) for k in list(options) if k in cls.__dataclass_fields__}


def known_fields(options: dict, cls: type) -> dict:
    """``options`` after checking that each is a field of the dataclass ``cls`` (TypeError naming
    the unknown ones: a mistyped option is an error, never silently ignored)."""
    unknown = sorted(set(options) - set(cls.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    return options


NO_GUIDANCE = Guidance()


@dataclass(frozen=True)
class SolverChoice:
    """A user's choice of sampler; every None means "the run's own" (its config's ``sample``
    section). ``nfe`` sets the steps from a budget of network evaluations instead of ``steps``."""

    method: str | None = None
    steps: int | None = None
    nfe: int | None = None
    grid: str | None = None
    grid_shift: float | None = None
    diffusion: str | None = None
    diffusion_norm: float | None = None


@dataclass(frozen=True)
class SampleJob:
    """What to sample from a run: ``n`` samples seeded by ``seed`` (sample ``i`` from
    ``(seed, i)``), all of class ``label`` (else ``i % num_classes``), with ``solver`` and
    ``guidance``, ``batch_size`` per forward pass (the results do not depend on it), the EMA or raw
    weights, latents decoded through ``vae`` (None: the VAE recorded at training time), the network
    ``torch.compile``-d or not (``compile``; None: the run's ``sample.compile``)."""

    n: int
    seed: int = 0
    batch_size: int = 64
    label: int | None = None
    solver: SolverChoice = SolverChoice()
    guidance: Guidance = NO_GUIDANCE
    use_ema: bool = True
    vae: str | None = None
    device: str = "auto"
    progress: bool = True
    compile: bool | None = None

    @classmethod
    def from_options(cls, n: int, **options) -> SampleJob:
        """A job from flat keywords (the style of the CLI and of older callers): the
        :class:`SolverChoice` fields, ``cfg_scale`` / ``cfg_interval`` for guidance, and this
        class's own fields. An unknown keyword raises TypeError naming it."""
        solver = SolverChoice(**take_fields(options, SolverChoice))
        guidance = Guidance.from_options(options)
        return cls(n=n, solver=solver, guidance=guidance, **known_fields(options, cls))

    def check(self) -> None:
        """Raise ValueError for an impossible job (before any work starts)."""
        if self.n < 1:
            raise ValueError("n: must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


@dataclass
class Samples:
    """What :meth:`Run.sample` returns: ``x`` (n, *data_shape) in the model's space (latents for a
    latent model, see :meth:`Run.decode`); ``nfe`` solver evaluations per sample; ``network_evals``
    network passes per sample (twice the guided evaluations)."""

    x: torch.Tensor
    nfe: int
    network_evals: int


class Run:
    """A trained flow model with everything needed to sample it.

    Args:
        model: the velocity network ``model(x, t, y)`` (the EMA copy, for samples).
        config: its resolved config (path, sampling defaults, ...).
        data_shape: the shape of one sample in the model's space.
        num_classes: classes the model is conditioned on (0: unconditional).
        latent: for latent models, what decoding needs (VAE source, normalisation, image size).
        class_names: the data set's class names, when known.
        checkpoint: the file the run was loaded from (None for a live training run).
        state: the raw checkpoint it was loaded from (None for a live run); ``step`` comes from it.
    """

    def __init__(self, model: nn.Module, config: Config, *, data_shape: tuple[int, ...],
                 num_classes: int = 0, latent: dict | None = None,
                 class_names: list[str] | None = None, checkpoint: Path | None = None,
                 state: dict | None = None):
        self.model, self.config = model, config
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = int(num_classes)
        self.latent, self.class_names = latent, class_names
        self.checkpoint, self.state = checkpoint, state
        self.step = int(state.get("step", 0)) if state else 0  # the training step of the weights
        self.path: AffinePath = build_path(config.path.scheduler, **config.path.params)
        self._autoencoders: dict[str | None, object] = {}
        self._compiled: tuple[nn.Module, nn.Module] | None = None  # (model, torch.compile(model))

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | Path, *, use_ema: bool = True,
             device: str | torch.device = "cpu") -> Run:
        """The run stored in a checkpoint file, a run directory (its ``checkpoints/latest.pt``), an
        exported folder (``flowmatch export``: model.safetensors + config.json, no training
        checkpoint needed) or on the Hugging Face Hub (``"hf://owner/name[@revision]"``, downloaded
        with ``huggingface_hub``; see :func:`flowmatch.checkpoint.find_checkpoint`).

        ``use_ema`` picks the EMA weights (what samples should use) over the raw training weights.
        Raises :class:`~flowmatch.checkpoint.CheckpointError` for a file that is not a usable
        checkpoint (foreign, truncated, a stored config or weights that do not fit).
        """
        file = find_checkpoint(source)
        state = load_checkpoint(file, map_location="cpu",
                                require=SAMPLE_KEYS if use_ema else (*SAMPLE_KEYS, "model"))
        try:
            cfg = experiment_from_dict(state["config"])
            data_shape, num_classes = tuple(state["data_shape"]), int(state["num_classes"])
        except (KeyError, ConfigError) as e:
            raise CheckpointError(f"{file}: its stored config is unusable: {e}") from None
        num_classes = num_classes if cfg.model.class_cond else 0
        model = build_model_from_config(cfg, data_shape, num_classes)
        try:
            model.load_state_dict(state["ema" if use_ema else "model"])
        except RuntimeError as e:
            raise CheckpointError(f"{file}: weights do not fit the stored architecture: "
                                  f"{str(e).splitlines()[0]}") from None
        run = cls(model.to(device).eval(), cfg, data_shape=data_shape, num_classes=num_classes,
                  latent=state.get("latent"), class_names=state.get("class_names"),
                  checkpoint=file, state=state)
        return run

    @classmethod
    def for_job(cls, source: str | Path, job: SampleJob, device: str | torch.device = "cpu") -> Run:
        """:meth:`load` for a :class:`SampleJob`: its weights and compile choice, and its guidance
        checked against the run (refused before any work, e.g. for an unconditional run)."""
        run = cls.load(source, use_ema=job.use_ema, device=device)
        if job.compile is not None:
            run.config.sample.compile = job.compile
        run.velocity_model(job.guidance)
        return run

    # -- facts -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def is_latent(self) -> bool:
        return bool(self.latent)

    @property
    def makes_images(self) -> bool:
        """True when samples are images once decoded (pixel models of (C, H, W), latent models)."""
        return self.is_latent or len(self.data_shape) == 3

    def labels(self, indices, label: int | None = None) -> torch.Tensor | None:
        """The class of each sample in ``indices``: ``label`` for all, else ``i % num_classes``;
        None for an unconditional model (which refuses a ``label``)."""
        if not self.num_classes:
            if label is not None:
                raise ValueError("label: this model is unconditional")
            return None
        ids = torch.tensor([int(i) for i in indices], device=self.device)
        if label is None:
            return ids % self.num_classes
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label: must be in [0, {self.num_classes - 1}]")
        return torch.full_like(ids, label)

    def settings(self, solver: SolverChoice = SolverChoice(), label: int | None = None) -> SampleSettings:
        """Resolved sampling settings: the run's ``sample`` section with the non-None choices of
        ``solver``. Raises ValueError naming the setting (unknown method, an NFE the method cannot
        spend exactly, a label the model cannot take, ``meanflow`` for a model without two times, ...)."""
        settings = resolve_settings(self.config.sample, **dataclasses.asdict(solver), label=label,
                                    num_classes=self.num_classes)
        check_two_time(self.model, settings.method)
        return settings

    @property
    def network(self) -> nn.Module:
        """The network sampling calls: :attr:`model`, or with the config's ``sample.compile`` its
        ``torch.compile`` (built once, on first use; it shares the model's live weights, so the EMA
        a training run keeps updating is what it computes with)."""
        if not self.config.sample.compile:
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model))
        return self._compiled[1]

    def velocity_model(self, guidance: Guidance = NO_GUIDANCE) -> nn.Module:
        """The network (:attr:`network`), wrapped in classifier-free guidance when ``guidance`` is
        active."""
        if not guidance.active:
            return self.network
        if self.num_classes and self.config.train.label_dropout <= 0:
            raise ValueError(f"cfg_scale {guidance.scale:g}: this run was trained with "
                             "train.label_dropout = 0, so its null class (the unconditional velocity "
                             "guidance needs) never saw training; sample with cfg_scale 1, or train "
                             "with label dropout (e.g. 0.1)")
        from flowmatch.flow.guidance import ClassifierFreeGuidance

        return ClassifierFreeGuidance(self.network, guidance.scale, tuple(guidance.interval))

    # -- sampling --------------------------------------------------------------------------------

    def start(self, indices, *, seed: int, label: int | None = None):
        """The starting point of samples ``indices``: ``(x0, y)``, the noise
        ``seeded_noise(indices, data_shape, seed)`` (n, *data_shape) and the labels (or None)."""
        x0 = seeded_noise(indices, self.data_shape, seed=seed, device=self.device)
        return x0, self.labels(indices, label)

    def sample(self, indices, settings: SampleSettings, *, seed: int, label: int | None = None,
               guidance: Guidance = NO_GUIDANCE) -> Samples:
        """Samples ``indices`` (global sample indices) in the model's space.

        Sample ``i`` starts from ``seeded_noise([i], data_shape, seed)``, has class
        :meth:`labels` and (SDE samplers) per-step noise seeded by ``(seed, i)``: the result for
        an index never depends on the other indices of the call.
        """
        indices = [int(i) for i in indices]
        model = self.velocity_model(guidance)
        x0, y = self.start(indices, seed=seed, label=label)
        res = generate_with_settings(model, x0, settings, path=self.path, y=y,
                                     indices=indices, seed=seed, atol=self.config.sample.atol,
                                     rtol=self.config.sample.rtol)
        # the guidance wrapper counts its passes per call (a guided call is 2), i.e. per sample
        passes = model.network_evals if guidance.active else res.nfe
        return Samples(x=res.x, nfe=res.nfe, network_evals=passes)

    def sample_batches(self, indices, settings: SampleSettings, job: SampleJob):
        """:meth:`sample` over ``indices`` in batches of ``job.batch_size``: yields
        ``(batch_indices, Samples)``."""
        indices = [int(i) for i in indices]
        for start in range(0, len(indices), job.batch_size):
            idx = indices[start:start + job.batch_size]
            yield idx, self.sample(idx, settings, seed=job.seed, label=job.label, guidance=job.guidance)

    # -- latents ---------------------------------------------------------------------------------

    def autoencoder(self, vae: str | None = None):
        """The frozen VAE that decodes this latent run's samples (loaded once per source), with the
        normalisation recorded at training time. ``vae`` overrides where it is loaded from."""
        if not self.is_latent:
            raise ValueError("this run is not a latent model: there is nothing to decode")
        if vae not in self._autoencoders:
            self._autoencoders[vae] = load_autoencoder_for(self.latent, device=self.device, vae=vae)
        return self._autoencoders[vae]

    def decode(self, x: torch.Tensor, *, vae: str | None = None, batch_size: int = 16) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for samples of this run: latents go through the VAE;
        pixel samples are returned as they are."""
        if not self.is_latent:
            return x
        return self.autoencoder(vae).decode(x.to(self.device), batch_size=batch_size)


def model_from_checkpoint(path: str | Path, *, use_ema: bool = True,
                          device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Rebuild the network stored in a checkpoint file or run directory.

    Returns (model in eval mode on ``device``, its resolved :class:`Config`, the raw state dict).
    Kept for existing callers; :meth:`Run.load` gives the whole run.
    """
    run = Run.load(path, use_ema=use_ema, device=device)
    return run.model, run.config, run.state


def save_samples(x: torch.Tensor, out: str | Path, *, nrow: int | None = None,
                 ref: torch.Tensor | None = None) -> Path:
    """Write samples ``x`` (n, *shape) to one file chosen by ``out``'s suffix; returns ``out``.

    ``.npy``: the array as is; ``.pt``: the tensor; ``.png``: images (n, C, H, W) as a grid of
    ``nrow`` columns (default: about square) upscaled to about 128 px a tile, or 2-D points (n, 2)
    as a scatter plot (over the points ``ref``, when given). Raises ValueError for any other suffix
    or a ``.png`` of other data.
    """
    import numpy as np

    from flowmatch.imageio import save_image_grid
    from flowmatch.plots import save_scatter

    out = Path(out)
    shape = tuple(x.shape[1:])
    if out.suffix == ".png" and len(shape) != 3 and shape != (2,):
        raise ValueError(f"a .png needs image or 2-D data; this model makes {shape}: use .npy")
    if out.suffix not in (".png", ".npy", ".pt"):
        raise ValueError(f"unsupported suffix {out.suffix!r} (use .png, .npy, or a folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, x.numpy())
    elif out.suffix == ".pt":
        torch.save(x, out)
    elif len(shape) == 3:
        save_image_grid(x, out, nrow=nrow, upscale=max(1, 128 // shape[-1]))
    else:
        save_scatter(x, out, ref=ref)
    return out
