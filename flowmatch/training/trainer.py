"""The flow-matching training run: a :class:`Config` in, a run directory out (checkpoints, metrics,
loss curve, sample grids), resumable after Ctrl-C or a crash, bit for bit.

The loop composes three pieces (t = 0 is noise, t = 1 is data)::

    batch = source(k)                        flowmatch.training.batches: plain stream, OT-coupled
                                             (prefetched in a thread), or a teacher's pair store
    (x_t, t, target) = objective(batch)      flowmatch.training.objectives: flow matching
                                             (x_t, u_t from the path) or segment distillation
    loss = mean || model(x_t, t, y) - target ||^2   [+ train.cosine_weight * mean (1 - cos)]
    learner.train_step(...)                  flowmatch.training.loop: AdamW, warm-up + cosine LR,
                                             accumulation, clipping, AMP, EMA

Everything random in micro-step ``k`` is a pure function of ``(seed, k)`` (see
:mod:`flowmatch.training.batches`), so a resumed run continues exactly as if it had never stopped
and the batches do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowmatch import distributed
from flowmatch.atomic import atomic_open
from flowmatch.checkpoint import RESUME_KEYS, CheckpointError, load_checkpoint
from flowmatch.components import (
    build_model_from_config,
    latent_info,
    resolve_config,
)
from flowmatch.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from flowmatch.data import build_dataset
from flowmatch.deprecation import moved_names
from flowmatch.flow.coupling import build_coupling
from flowmatch.flow.paths import build_path
from flowmatch.flow.time_samplers import build_time_sampler
from flowmatch.models import UNet, count_parameters
from flowmatch.run import Run, save_samples
from flowmatch.rundir import lock_run_dir, remove_stale_temps
from flowmatch.training.batches import (
    STREAM_GRID,
    BatchStream,
    CoupledSource,
    MemoryRows,
    PairBatches,
    PlainBatches,
    StepDraws,
    StreamLoader,
    all_gather,
)
from flowmatch.training.ema import EMA, ema_decay_from_halflife
from flowmatch.training.loop import (
    Checkpoints,
    Learner,
    MetricsLog,
    NonFiniteLossError,
    StopOnInterrupt,
    TensorBoardLog,
    UpdateRule,
    amp_dtype,
    autocast,
    progress_bar,
    record_launch,
    stop_status,
)
from flowmatch.training.lr import LRSchedule
from flowmatch.training.objectives import (
    FlowMatching,
    MeanFlow,
    MeanFlowSettings,
    SegmentDistillation,
    cosine_distance,
    velocity_loss,
)

__all__ = [
    "Trainer",
    "TrainResult",
    "fast_paths",
    "NonFiniteLossError",
    "BatchStream",
]



@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    status: str  # "finished" | "interrupted" (Ctrl-C) | "terminated" (SIGTERM); both with a checkpoint
    run_dir: Path
    last_loss: float


# What a resumed run must share with its checkpoint (besides the model, checked apart): the data, the
# probability path and the objective. Schedules, budgets, logging and sampling may change.
RESUME_MUST_MATCH = ("data", "path", "train.objective")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resume_conflicts(saved: Config, cfg: Config, saved_latent: dict | None,
                     latent: dict | None) -> list[str]:
    """``"key: checkpoint X, config Y"`` for each setting under :data:`RESUME_MUST_MATCH` that differs
    between a checkpoint's config and this one, and for a latent store from another VAE or with
    another normalisation (same shape, other latent space)."""
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    keys = sorted(k for k in set(old) | set(new)
                  if any(k == r or k.startswith(r + ".") for r in RESUME_MUST_MATCH) and old.get(k) != new.get(k))
    out = [f"{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}" for k in keys]
    for part in ("vae", "normalization"):
        was, now = (saved_latent or {}).get(part), (latent or {}).get(part)
        if was != now:
            out.append(f"latent {part}: checkpoint {was!r}, data {now!r}")
    return out


def _in_memory(dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(X, Y) tensors for a data set that already lives in memory (toys, digits), else None."""
    for name in ("points", "images"):
        x = getattr(dataset, name, None)
        if isinstance(x, torch.Tensor) and isinstance(getattr(dataset, "labels", None), torch.Tensor):
            return x, dataset.labels
    return None


def fast_paths(device: torch.device) -> dict:
    """The speed settings training takes on ``device``, as a dict:

    - ``"adamw"``: AdamW's implementation keywords. CUDA: ``fused=True`` (one kernel for the whole
      update); elsewhere ``foreach=True`` (one batched update over all tensors; the per-tensor
      loop, torch's CPU default, is a third of a small model's step), as CPU runs always had.
    - ``"tf32"``: CUDA only: fp32 matmuls run on TF32 tensor cores
      (``torch.set_float32_matmul_precision("high")``: a 10-bit mantissa for the products,
      float32 accumulation; cuDNN convolutions already use TF32 by torch's default). Set for the
      whole process when a training run starts on a GPU.
    - ``"channels_last"``: CUDA only: convolutional networks (the U-Net) keep activations and
      weights in channels-last (NHWC) memory format, the layout cuDNN's fastest kernels use.

    On CPU nothing changes: the results are bit for bit those of earlier versions.
    """
    cuda = torch.device(device).type == "cuda"
    return {"adamw": {"fused": True} if cuda else {"foreach": True}, "tf32": cuda, "channels_last": cuda}


class _LogWindow:
    """The steps since the last log line: their mean loss and the training speed over them."""

    def __init__(self, step: int):
        self.step, self.loss_sum, self.time = step, 0.0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss_sum += loss

    def close(self, step: int, images_per_step: int) -> tuple[float, float]:
        """(mean loss, samples per second) since the last call; starts the next window."""
        now = time.perf_counter()
        speed = (step - self.step) * images_per_step / max(now - self.time, 1e-9)
        mean_loss = self.loss_sum / (step - self.step)
        self.step, self.loss_sum, self.time = step, 0.0, now
        return mean_loss, speed


class Trainer:
    """Train the model a :class:`Config` describes; ``fit()`` runs (or resumes) to ``train.steps``.

    Usable from Python::

        cfg = load_config("configs/digits_unet.yaml", ["train.steps=200"])
        result = Trainer(cfg).fit()

    ``_train_step(source)`` is one optimizer step; a subclass may wrap it to act between steps.
    """

    def __init__(self, cfg: Config, *, resume: bool = True, progress: bool = True,
                 force_resume: bool = False):
        self.cfg = cfg = resolve_config(cfg)  # checked, defaults filled: what config.yaml stores
        self.resume, self.force_resume = resume, force_resume
        self.progress = progress
        if cfg.train.log.tensorboard:
            TensorBoardLog.require()  # a missing extra fails now, before any work
        self.dist, self.device = distributed.init(cfg.device)
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        tc = cfg.train
        self._load_data()
        self._build_learner()
        self.path = build_path(cfg.path.scheduler, **cfg.path.params)
        self.time_sampler = build_time_sampler(tc.time_sampler.name, shift=tc.time_sampler.shift,
                                               **tc.time_sampler.params)
        # Minibatch OT coupling: a pure function of the micro-step, so prefetchable
        self.coupling = build_coupling(tc.coupling.name, **tc.coupling.params)
        self.coupled = tc.coupling.name != "none"
        self.draws = StepDraws(cfg.seed, self.global_batch, self.data_shape, self.time_sampler,
                               tc.label_dropout, self.posterior, cfg.data.hflip, self.device)
        if self.pairs and tc.objective == "segments":
            self.objective = SegmentDistillation(self.dataset.times, cfg.seed, self.global_batch,
                                                 self.stream.rows)
        elif tc.objective == "meanflow":
            m = tc.meanflow
            sampler = build_time_sampler(m.time_sampler.name, shift=m.time_sampler.shift,
                                         **m.time_sampler.params)
            settings = MeanFlowSettings(sampler, m.equal_fraction, m.adaptive_power, m.adaptive_eps,
                                        m.cfg_scale, m.cfg_mix,
                                        interval_warmup=m.interval_warmup_steps * tc.grad_accum)
            self.objective = MeanFlow(self.path, settings, cfg.seed, self.global_batch, self.stream.rows)
        else:
            self.objective = FlowMatching(self.path)
        self.checkpoints = Checkpoints(self.ckpt_dir, require=RESUME_KEYS)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", plot=self.run_dir / "loss.png",
                                  title=f"{cfg.name}: flow-matching loss")
        self.tensorboard: TensorBoardLog | None = None  # opened by rank 0 with the run (train.log)
        self._source = None  # the batch source of the running fit()
        self._run: Run | None = None  # the sampling view of this run (built on first use)
        self._vae_failed = False  # the latent grids' VAE could not be loaded: grids stay latents
        self._cosine_terms: list[torch.Tensor] = []  # train.cosine_weight > 0: since the last log line

    # -- set-up ----------------------------------------------------------------------------------

    def _load_data(self) -> None:
        cfg = self.cfg
        self.dataset = build_dataset(cfg.data.kind, **cfg.data.params)
        self.data_shape = tuple(self.dataset.data_shape)
        self.num_classes = int(self.dataset.num_classes)
        if cfg.data.shape and tuple(cfg.data.shape) != self.data_shape:
            raise ConfigError(f"data.shape: the config expects items of shape {tuple(cfg.data.shape)}, "
                              f"the data set gives {self.data_shape}")
        if cfg.data.hflip and (len(self.data_shape) != 3 or getattr(self.dataset, "kind", "") == "latent"):
            raise ConfigError("data.hflip: horizontal flips need pixel images (C, H, W); for latents "
                              "store flipped copies instead (flowmatch encode-latents --flip)")
        self.global_batch = cfg.train.batch_size * self.dist.world_size
        self.images_per_step = self.global_batch * cfg.train.grad_accum
        self.posterior = bool(getattr(self.dataset, "posterior", False))
        self.stream = BatchStream(len(self.dataset), self.global_batch, cfg.seed,
                                  self.dist.rank, self.dist.world_size)
        self.memory = _in_memory(self.dataset)
        self.pairs = getattr(self.dataset, "kind", "") == "pairs"  # a teacher's pair store

    def _build_learner(self) -> None:
        """Model (seeded initial weights, or train.init_from), EMA, DDP, ``torch.compile``
        (train.compile), AdamW, AMP: the Learner; on CUDA with the :func:`fast_paths` settings."""
        cfg, tc = self.cfg, self.cfg.train
        fast = fast_paths(self.device)
        if fast["tf32"]:  # process-wide, and only ever on CUDA: a CPU run's numbers do not change
            torch.set_float32_matmul_precision("high")
        torch.manual_seed(cfg.seed)  # initial weights
        self.model = build_model_from_config(cfg, self.data_shape, self.num_classes).to(self.device)
        if tc.init_from:
            self._init_from(tc.init_from)
        if fast["channels_last"] and isinstance(self.model, UNet):
            self.model.use_channels_last()
        self.ema = EMA(self.model)
        ddp = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # What _loss calls. The compiled module wraps (DDP around) self.model and shares its
        # parameters; self.model itself stays plain, so the EMA and checkpoints keep plain state-dict
        # keys (no "_orig_mod." prefixes). DDP is compiled from outside, as torch's DDP notes advise.
        self.ddp_model = torch.compile(ddp) if tc.compile else ddp
        self.optimizer = torch.optim.AdamW(list(self.model.parameters()), lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay, **fast["adamw"])
        self.amp_dtype = amp_dtype(tc.mixed_precision, self.device)  # None on CPU
        ema_decay = tc.ema_decay
        if tc.ema_halflife_images > 0:
            ema_decay = ema_decay_from_halflife(tc.ema_halflife_images, self.images_per_step)
        rule = UpdateRule(LRSchedule(tc.lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio),
                          grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, ema_decay=ema_decay,
                          ema_start_step=tc.ema_start_step)
        self.learner = Learner(
            self.model, self.optimizer, self.ema, rule, ddp_model=ddp,
            scaler=torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16),
            checkpoint=self.ckpt_dir / "latest.pt")

    def _init_from(self, source: str) -> None:
        """Start from another run's EMA weights (reflow / distillation students, fine-tuning)."""
        from flowmatch.checkpoint import find_checkpoint

        file = find_checkpoint(source)
        state = load_checkpoint(file, map_location=self.device, require=("ema",))
        try:
            self.model.load_state_dict(state["ema"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"train.init_from: the weights in {file} do not fit this model "
                                  f"({str(e).splitlines()[0]})") from None
        distributed.print0(f"initialised from the EMA weights of {file} (step {state.get('step')})")

    @property
    def history(self) -> list[dict]:
        """The metric records of this run so far (what metrics.jsonl holds)."""
        return self.metrics.records

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.learner.step

    def describe(self) -> str:
        n = count_parameters(self.model)
        return (f"{self.cfg.model.arch} with {n:,} trainable parameters ({n / 1e6:.2f}M) on "
                f"{self.data_shape} data, {len(self.dataset)} items, {self.num_classes} classes; "
                f"global batch {self.images_per_step} = {self.cfg.train.batch_size} x "
                f"{self.dist.world_size} process(es) x {self.cfg.train.grad_accum} accumulation; "
                f"device {self.device}")

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": config_to_dict(self.cfg),
            **self.learner.state_dict(),  # model, ema, optimizer, scaler
            "data_shape": list(self.data_shape),
            "num_classes": self.num_classes if self.cfg.model.class_cond else 0,
            "world_size": self.dist.world_size,
            "global_batch": self.images_per_step,
            "latent": latent_info(self.dataset),
            "class_names": getattr(self.dataset, "class_names", None) if self.cfg.model.class_cond else None,
        }

    def save(self, keep: bool = False) -> None:
        """Write checkpoints/latest.pt (rank 0 only), and a numbered snapshot when ``keep``."""
        if self.dist.is_main:
            self.checkpoints.write(self.state_dict(), snapshot=keep)
        distributed.barrier()

    def _try_resume(self) -> None:
        """Load ``latest.pt`` when resuming; first refuse a checkpoint this config cannot continue."""
        path = self.checkpoints.latest
        state = self.checkpoints.read(self.device) if self.resume else None
        if state is None:
            return
        saved = resolve_config(config_from_dict(state["config"]))
        if (saved.model.arch, saved.model.params, saved.model.class_cond) != (
                self.cfg.model.arch, self.cfg.model.params, self.cfg.model.class_cond):
            raise CheckpointError(
                f"{path} was trained with a different model (model section differs); "
                "use another out_dir or --no-resume")
        if tuple(state["data_shape"]) != self.data_shape:
            raise CheckpointError(f"{path} was trained on data of shape {tuple(state['data_shape'])},"
                                  f" this config gives {self.data_shape}")
        conflicts = resume_conflicts(saved, self.cfg, state.get("latent"), latent_info(self.dataset))
        if conflicts and not self.force_resume:
            raise CheckpointError(f"{path} was trained on other data, path or objective "
                                  f"({'; '.join(conflicts)}); use another out_dir, --no-resume, or "
                                  "--force-resume to continue it with this config")
        if conflicts:
            distributed.print0(f"warning: --force-resume: continuing {path} with {'; '.join(conflicts)}")
        if state.get("global_batch") != self.images_per_step:
            distributed.print0(f"warning: resuming with global batch {self.images_per_step}, the "
                               f"checkpoint used {state.get('global_batch')}: not an exact resume")
        self.learner.load_state_dict(state)
        distributed.print0(f"resumed from {path} at step {self.step}")

    # -- one step --------------------------------------------------------------------------------

    def batch_source(self, start_k: int):
        """``source(k) -> Batch`` for micro-steps ``start_k, start_k + 1, ...`` of this run."""
        tc = self.cfg.train
        if self.pairs:
            return PairBatches(self.dataset, self.stream, self.draws)
        loader = None
        if self.memory is None:
            loader = StreamLoader(self.dataset, self.stream, start_k, tc.num_workers)
        if not self.coupled:
            read = loader or MemoryRows(*self.memory, self.stream.local_indices)
            return PlainBatches(read, self.draws, self.stream.rows)
        if loader is None:  # the coupling reads the global batch, in its own thread: its own stream
            read = MemoryRows(*self.memory, BatchStream(len(self.dataset), self.global_batch,
                                                        self.cfg.seed).global_indices)
        else:  # every process needs the whole batch
            def read(k):
                return tuple(all_gather(v, self.device) for v in loader(k))
        return CoupledSource(read, self.draws, self.coupling, self.stream.rows, self.cfg.model.class_cond)

    def _loss(self, batch) -> torch.Tensor:
        """``mean || model(x_t, t, y) - target ||^2`` on this process's rows of one micro-step
        (MeanFlow: ``model(x_t, t, y, r=r)``, adaptively weighted; its target passes, JVP included,
        run on the plain module: DDP synchronises the gradient pass only)."""
        meanflow = isinstance(self.objective, MeanFlow)
        if not meanflow:
            x_t, t, target = self.objective(batch)
        self.draws.seed_default_generators(batch.k, self.dist.rank)  # dropout masks
        y = None
        if self.cfg.model.class_cond:
            y = batch.y.to(self.device).long()
            if self.cfg.train.label_dropout > 0:  # classifier-free guidance: some rows unconditional
                y = torch.where(batch.drop.to(self.device), torch.full_like(y, self.model.null_class), y)
        if meanflow:  # the target's passes draw no random numbers (eval mode): same masks as flow
            rows = self.objective(batch, self.model, y, getattr(self.model, "null_class", None),
                                  amp=lambda: autocast(self.amp_dtype, self.device))
            with autocast(self.amp_dtype, self.device):
                u = self.ddp_model(rows.x_t, rows.t, y, r=rows.r)  # (B, *data_shape)
            return self.objective.loss(u, rows.target)
        with autocast(self.amp_dtype, self.device):
            v = self.ddp_model(x_t, t, y)  # (B, *data_shape)
        weight = self.cfg.train.cosine_weight
        if weight > 0:  # the direction term's value, for the "cosine" metric (no gradient, no sync)
            self._cosine_terms.append(cosine_distance(v.detach(), target))
        return velocity_loss(v, target, weight)

    def _train_step(self, source) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-steps of ``source``; (loss, grad norm)."""
        return self.learner.train_step(lambda k: self._loss(source(k)))

    # -- outputs ---------------------------------------------------------------------------------

    @property
    def run(self) -> Run:
        """This run as it samples now: the EMA (or raw, ``sample.use_ema: false``) weights with the
        config, classes and latent decoding of the data set (one object, so the VAE loads once)."""
        if self._run is None:
            model = self.ema.model if self.cfg.sample.use_ema else self.model
            self._run = Run(model, self.cfg, data_shape=self.data_shape,
                            num_classes=self.num_classes if self.cfg.model.class_cond else 0,
                            latent=latent_info(self.dataset))
        return self._run

    def sample_grid(self, path: Path | None = None) -> Path:
        """Samples of the run's ``sample`` settings from fixed noise (comparable across steps): a PNG
        grid for images (decoded for latent runs), a scatter plot over the data for 2-D points."""
        sc, run = self.cfg.sample, self.run
        n = sc.n if len(self.data_shape) == 3 else max(sc.n, 2000)
        x = run.sample(range(n), run.settings(), seed=self.cfg.seed * 1000 + STREAM_GRID).x.cpu()
        path = path or self.run_dir / "samples" / f"step_{self.step:07d}.png"
        if run.is_latent:
            images = self._decode_latents(x)
            if images is None:  # no VAE here: keep the latents themselves (the warning said why)
                return save_samples(x, path.with_suffix(".pt"))
            x = images
        if x.ndim != 4 and tuple(x.shape[1:]) != (2,):
            return save_samples(x, path.with_suffix(".pt"))
        nrow = run.num_classes if 0 < run.num_classes <= 16 else None
        ref = self.memory[0][: len(x)] if self.memory is not None and x.ndim == 2 else None
        return save_samples(x, path, nrow=nrow, ref=ref)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor | None:
        """Images for latent samples through the store's VAE; None (with one warning) if unavailable."""
        if self._vae_failed:
            return None
        try:
            return self.run.decode(z, batch_size=16).cpu()
        except (ImportError, OSError, RuntimeError, ValueError) as e:
            distributed.print0(f"warning: cannot load the VAE {self.run.latent['vae']!r} to decode "
                               f"sample grids ({e}); saving latents instead")
            self._vae_failed = True
            return None

    def _record_launch(self) -> None:
        record_launch(self.run_dir / "run.json", {
            "start_step": self.step, "time": time.time(), "world_size": self.dist.world_size,
            "batch_size_per_process": self.cfg.train.batch_size,
            "grad_accum": self.cfg.train.grad_accum, "global_batch": self.images_per_step,
            "device": self.device.type, "torch": torch.__version__,
        })

    # -- the loop --------------------------------------------------------------------------------

    def _open_run(self) -> None:
        """Resume (after its checks), then config.yaml (atomically: only a config that passed them),
        the metrics cut back to the resumed step, and the temp files of a killed writer removed."""
        self._try_resume()
        if self.dist.is_main:
            for folder in (self.run_dir, self.ckpt_dir):
                remove_stale_temps(folder)  # we hold the run's lock: no live writer owns them
            with atomic_open(self.run_dir / "config.yaml", "w") as f:
                f.write(dump_config(self.cfg))
            self.metrics.resume(self.step)
            if self.cfg.train.log.tensorboard:  # events after the resumed step are hidden, as above
                self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard", purge_step=self.step + 1)
            self._record_launch()
            distributed.print0(self.describe())

    def _after_step(self, loss: float, grad_norm: float, window: _LogWindow, bar) -> None:
        """The log line, sample grid and checkpoint due at this step."""
        tc, step = self.cfg.train, self.step
        window.add(loss)
        if step % tc.log_every == 0 or step == tc.steps:
            mean_loss, speed = window.close(step, self.images_per_step)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
            extra = {}
            if self._cosine_terms:  # mean 1 - cos(v, u) over the micro-steps and processes since
                terms, self._cosine_terms = torch.stack(self._cosine_terms), []  # the last line
                extra["cosine"] = float(distributed.all_reduce_mean(terms.mean()))
            if self.dist.is_main:
                record = {"step": step, "loss": mean_loss, "last_loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "samples_per_s": speed, "time": time.time(), **extra}
                self.metrics.append(record)
                if self.tensorboard is not None:
                    self.tensorboard.scalars(record)
        if tc.sample_every and step % tc.sample_every == 0 and self.dist.is_main:
            self._log_grid(self.sample_grid())
        keep = bool(tc.keep_every) and step % tc.keep_every == 0
        if (tc.save_every and step % tc.save_every == 0) or keep:
            self.save(keep=keep)

    def _close_run(self, status: str) -> None:
        self.save(keep=bool(self.cfg.train.keep_every) and status == "finished")
        latest = self.checkpoints.latest
        if status == "finished" and self.dist.is_main:
            final = self.sample_grid(self.run_dir / "samples.png")
            self._log_grid(final)
            distributed.print0(f"done: {self.step} steps; samples {final}; loss curve "
                               f"{self.run_dir / 'loss.png'}; checkpoint {latest}")
        elif status in ("interrupted", "terminated"):
            distributed.print0(f"{status} at step {self.step}; checkpoint written to {latest}; "
                               "run the same command to resume")
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _log_grid(self, grid: Path) -> None:
        """A sample grid (a PNG; other outputs are skipped) into TensorBoard, when it is on."""
        if self.tensorboard is not None:
            self.tensorboard.image("samples", grid, self.step)

    def fit(self) -> TrainResult:
        """Train (or resume) to ``train.steps``, holding the run directory's lock (one writer at a
        time). Ctrl-C or SIGTERM stops after the current step, with a checkpoint."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"out_dir: {self.run_dir} exists and is not a folder")
        with lock_run_dir(self.run_dir, "training"):
            return self._fit()

    def _fit(self) -> TrainResult:
        tc = self.cfg.train
        self._open_run()
        self._source = source = self.batch_source(self.step * tc.grad_accum)
        prefetch = contextlib.nullcontext()
        if isinstance(source, CoupledSource) and self.memory is not None:
            # the coupling of micro-step k + 1 runs in a thread while step k trains
            prefetch = source.start_prefetch(end=tc.steps * tc.grad_accum)
        bar = progress_bar(self.progress and self.dist.is_main, tc.steps, self.step, self.cfg.name)
        window, status, loss = _LogWindow(self.step), "finished", float("nan")
        self.model.train()
        with prefetch, bar, StopOnInterrupt() as interrupt:
            while self.step < tc.steps:
                loss, grad_norm = self._train_step(source)
                bar.update(1)
                self._after_step(loss, grad_norm, window, bar)
                stop = stop_status(interrupt, self.device)
                if stop is not None and self.step < tc.steps:
                    status = stop
                    break
        self._close_run(status)
        return TrainResult(step=self.step, status=status, run_dir=self.run_dir, last_loss=loss)


# names that used to live here, forwarded to their new modules with a DeprecationWarning
# (build_model_from_config and latent_info are imported here: they still resolve without one)
__getattr__ = moved_names(__name__, {"model_from_checkpoint": "flowmatch.run",
                                     "load_autoencoder_for": "flowmatch.components"})
