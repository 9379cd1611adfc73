"""The training loop: flow-matching loss, AdamW, warm-up + cosine LR, EMA, AMP, checkpoints, resume.

One step, for a data batch x1 (t = 0 is noise, t = 1 is data)::

    x0 ~ N(0, I),  t ~ time sampler,  (x_t, u_t) = path.sample(x0, x1, t)
    loss = mean || model(x_t, t, y) - u_t ||^2

Reproducibility is by construction rather than by saving RNG states: everything random in step
``s`` (batch order, noise, times, flips, label dropout, dropout masks) is drawn from generators
seeded by ``(seed, s, micro-step)``. The random draws cover the *global* batch and each process
takes its slice, so a run resumed at step k continues exactly as if it had never stopped, and the
batch a step sees does not depend on how many processes share it.

With ``train.coupling`` (minibatch OT, :mod:`flowmatch.flow.coupling`) the pairing of noise and data is
part of that pure function: every process computes the same permutation of the *global* batch's
noise rows, then takes its slice. For in-memory data the coupling of micro-step ``k + 1`` is
computed in a background thread while step ``k`` trains (same function of ``k``, own generators).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowmatch import distributed
from flowmatch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flowmatch.components import (
    build_model_from_config,
    latent_info,
    load_autoencoder_for,
)
from flowmatch.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from flowmatch.data import build_dataset
from flowmatch.flow.coupling import build_coupling
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import (
    generate_with_settings,
    resolve_settings,
    sample_seed,
    seeded_noise,
)
from flowmatch.flow.time_samplers import build_time_sampler
from flowmatch.imageio import save_image_grid, save_line_plot, save_scatter
from flowmatch.models import count_parameters
from flowmatch.training.ema import EMA, ema_decay_from_halflife
from flowmatch.training.lr import lr_at

__all__ = [
    "Trainer",
    "TrainResult",
    "NonFiniteLossError",
    "BatchStream",
]

# Distinct streams of randomness, so that e.g. the batch order never shares draws with the noise.
_STREAM_ORDER, _STREAM_STEP, _STREAM_GRID, _STREAM_SEGMENT = 1, 2, 3, 4


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; training stopped before the optimizer step."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    status: str  # "finished" | "interrupted"
    run_dir: Path
    last_loss: float


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------


class BatchStream:
    """Global batches as a pure function of the micro-step index.

    The data order is an endless concatenation of permutations of the data set, permutation ``e``
    drawn from seed ``(seed, e)``. Micro-step ``k`` takes positions ``[k G, (k+1) G)`` of that
    stream, ``G`` the global batch; process ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed * 1000 + _STREAM_ORDER, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_indices(self, k: int) -> torch.Tensor:
        start = k * self.global_batch
        out, pos = [], start
        while pos < start + self.global_batch:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.global_batch - pos)
            out.append(self._permutation(epoch)[offset: offset + take])
            pos += take
        return torch.cat(out)

    def local_indices(self, k: int) -> torch.Tensor:
        idx = self.global_indices(k)
        return idx[self.rank * self.local_batch: (self.rank + 1) * self.local_batch]


class _LoaderFromStream:
    """Read local batches for micro-steps k, k+1, ... through a DataLoader (workers for disk data)."""

    def __init__(self, dataset, stream: BatchStream, start_k: int, num_workers: int):
        class _Sampler(torch.utils.data.Sampler):
            def __iter__(inner):  # noqa: N805 - closure over the stream
                k = start_k
                while True:
                    yield stream.local_indices(k).tolist()
                    k += 1

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Sampler(), num_workers=num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )
        self.it = iter(self.loader)

    def next(self):
        x, y = next(self.it)
        return x, torch.as_tensor(y)


def _all_gather(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The concatenation over ranks (in rank order) of equal-shaped ``x``; ``x`` in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    x = x.to(device).contiguous()
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


def _in_memory(dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(X, Y) tensors for a data set that already lives in memory (toys, digits), else None."""
    for name in ("points", "images"):
        x = getattr(dataset, name, None)
        if isinstance(x, torch.Tensor) and isinstance(getattr(dataset, "labels", None), torch.Tensor):
            return x, dataset.labels
    return None


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Train the model a :class:`Config` describes; ``fit()`` runs (or resumes) to ``train.steps``.

    Usable from Python::

        cfg = load_config("configs/digits_unet.yaml", ["train.steps=200"])
        result = Trainer(cfg).fit()
    """

    def __init__(self, cfg: Config, *, resume: bool = True, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.dist, self.device = distributed.init(cfg.device)
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        tc = cfg.train

        # Data ------------------------------------------------------------------------------
        self.dataset = build_dataset(cfg.data.kind, **cfg.data.params)
        self.data_shape = tuple(self.dataset.data_shape)
        self.num_classes = int(self.dataset.num_classes)
        if cfg.data.shape and tuple(cfg.data.shape) != self.data_shape:
            raise ConfigError(f"data.shape: the config expects items of shape {tuple(cfg.data.shape)}, "
                              f"the data set gives {self.data_shape}")
        if cfg.data.hflip and (len(self.data_shape) != 3 or getattr(self.dataset, "kind", "") == "latent"):
            raise ConfigError("data.hflip: horizontal flips need pixel images (C, H, W); for latents "
                              "store flipped copies instead (flowmatch encode-latents --flip)")
        self.global_batch = tc.batch_size * self.dist.world_size
        self.images_per_step = self.global_batch * tc.grad_accum
        self.posterior = bool(getattr(self.dataset, "posterior", False))
        self._autoencoder = None  # loaded on first use, to decode latent samples into images
        self.stream = BatchStream(len(self.dataset), self.global_batch, cfg.seed,
                                  self.dist.rank, self.dist.world_size)
        self.memory = _in_memory(self.dataset)
        self.pairs = getattr(self.dataset, "kind", "") == "pairs"  # a teacher's pair store

        # Model, EMA, optimizer ----------------------------------------------------------------
        torch.manual_seed(cfg.seed)  # initial weights
        self.model = build_model_from_config(cfg, self.data_shape, self.num_classes).to(self.device)
        if tc.init_from:
            self._init_from(tc.init_from)
        self.ema = EMA(self.model)
        self.ddp_model = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.params = list(self.model.parameters())
        # foreach: one fused update over all tensors (the per-tensor loop, torch's CPU default, is a
        # third of a small model's step)
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay, foreach=True)
        self.path = build_path(cfg.path.scheduler, **cfg.path.params)
        self.time_sampler = build_time_sampler(tc.time_sampler.name, shift=tc.time_sampler.shift,
                                               **tc.time_sampler.params)
        if tc.ema_halflife_images > 0:
            self.ema_decay = ema_decay_from_halflife(tc.ema_halflife_images, self.images_per_step)
        else:
            self.ema_decay = tc.ema_decay

        # Minibatch OT coupling: a pure function of the micro-step, so prefetchable ---------------
        self.coupling = build_coupling(tc.coupling.name, **tc.coupling.params)
        self.coupled = tc.coupling.name != "none"
        # The background thread reads batch indices from its own stream (BatchStream caches state).
        self._coupling_stream = BatchStream(len(self.dataset), self.global_batch, cfg.seed)
        self._prefetch_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._prefetched: tuple[int, concurrent.futures.Future] | None = None

        # Mixed precision: a no-op context on CPU ----------------------------------------------
        self.amp_dtype = self._amp_dtype(tc.mixed_precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.step = 0
        self.history: list[dict] = []
        self._stop_requested = False

    # -- set-up helpers --------------------------------------------------------------------------

    def _amp_dtype(self, mode: str) -> torch.dtype | None:
        if self.device.type != "cuda" or mode == "no":
            if mode in ("bf16", "fp16") and self.device.type != "cuda":
                distributed.print0(f"note: train.mixed_precision={mode} needs CUDA; training in fp32")
            return None
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _init_from(self, source: str) -> None:
        """Start from another run's EMA weights (reflow / distillation students, fine-tuning)."""
        from flowmatch.checkpoint import find_checkpoint

        file = find_checkpoint(source)
        state = load_checkpoint(file, map_location=self.device)
        try:
            self.model.load_state_dict(state["ema"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"train.init_from: the weights in {file} do not fit this model "
                                  f"({str(e).splitlines()[0]})") from None
        distributed.print0(f"initialised from the EMA weights of {file} (step {state.get('step')})")

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
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data_shape": list(self.data_shape),
            "num_classes": self.num_classes if self.cfg.model.class_cond else 0,
            "world_size": self.dist.world_size,
            "global_batch": self.images_per_step,
            "latent": latent_info(self.dataset),
        }

    def save(self, keep: bool = False) -> None:
        """Write checkpoints/latest.pt (rank 0 only), and a numbered snapshot when ``keep``."""
        if self.dist.is_main:
            state = self.state_dict()
            save_checkpoint(state, self.ckpt_dir / "latest.pt")
            if keep:
                save_checkpoint(state, self.ckpt_dir / f"step_{self.step:07d}.pt")
        distributed.barrier()

    def _try_resume(self) -> None:
        path = self.ckpt_dir / "latest.pt"
        if not (self.resume and path.is_file()):
            return
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state["config"])
        if (saved.model.arch, saved.model.params, saved.model.class_cond) != (
                self.cfg.model.arch, self.cfg.model.params, self.cfg.model.class_cond):
            raise CheckpointError(
                f"{path} was trained with a different model (model section differs); "
                "use another out_dir or --no-resume")
        if tuple(state["data_shape"]) != self.data_shape:
            raise CheckpointError(f"{path} was trained on data of shape {tuple(state['data_shape'])},"
                                  f" this config gives {self.data_shape}")
        if state.get("global_batch") != self.images_per_step:
            distributed.print0(f"warning: resuming with global batch {self.images_per_step}, the "
                               f"checkpoint used {state.get('global_batch')}: not an exact resume")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        distributed.print0(f"resumed from {path} at step {self.step}")

    # -- one step --------------------------------------------------------------------------------

    def _step_generator(self, k: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.cfg.seed * 1000 + _STREAM_STEP, k))

    def _local_batch(self, k: int, loader) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is not None:
            X, Y = self.memory
            idx = self.stream.local_indices(k)
            return X[idx], Y[idx]
        return loader.next()

    def _step_draws(self, k: int):
        """All randomness of micro-step ``k`` for the *global* batch, drawn on the CPU in a fixed
        order from a fresh generator seeded by ``(seed, k)``: (x0, t, flip, drop, eps or None)."""
        tc, G = self.cfg.train, self.global_batch
        g = self._step_generator(k)
        x0 = torch.randn((G, *self.data_shape), generator=g)
        t = self.time_sampler(G, generator=g)
        flip = torch.rand(G, generator=g) < 0.5
        drop = torch.rand(G, generator=g) < tc.label_dropout
        eps = torch.randn((G, *self.data_shape), generator=g) if self.posterior else None
        return x0, t, flip, drop, eps

    def _pairs(self, k: int, x1: torch.Tensor, rows: slice):
        """(x0, x1, t, drop) for the batch rows ``rows`` of micro-step ``k``; ``x1`` holds those rows."""
        x0, t, flip, drop, eps = (d if d is None else d[rows] for d in self._step_draws(k))
        x1 = x1.to(self.device, non_blocking=True).float()
        if eps is not None:
            # A latent store in posterior mode gives [mean, std] (both normalised): draw a fresh
            # latent z = m + s * eps from this step's generator, so resume stays exact.
            mean, std = x1.chunk(2, dim=1)
            x1 = torch.addcmul(mean, std, eps.to(self.device))
        if self.cfg.data.hflip:
            x1 = torch.where(flip.view(-1, 1, 1, 1).to(self.device), x1.flip(-1), x1)
        return x0.to(self.device), x1, t.to(self.device), drop

    def _coupled_global_batch(self, k: int, x1: torch.Tensor | None = None,
                              y: torch.Tensor | None = None):
        """The global batch of micro-step ``k`` with its noise rows re-paired by the coupling.

        ``x1, y``: the global data batch, or None to read it from the in-memory data set (what the
        prefetch thread does). The coupling sees x1 exactly as trained on (posterior draw and flip
        applied) and, for class-conditional models, the true labels (before label dropout: dropped
        samples keep their class-wise pairing, still a coupling of the two marginals).
        Returns global (x0, x1, t, y, drop).
        """
        if x1 is None:
            X, Y = self.memory
            idx = self._coupling_stream.global_indices(k)
            x1, y = X[idx], Y[idx]
        x0, x1, t, drop = self._pairs(k, x1, slice(None))
        labels = y if self.cfg.model.class_cond else None
        perm = self.coupling(x0, x1, labels)  # noise row perm[i] pairs with data row i
        return x0[perm], x1, t, y, drop

    def _coupled_batch(self, k: int, loader):
        """This process's slice of :meth:`_coupled_global_batch` for micro-step ``k``."""
        B, r = self.cfg.train.batch_size, self.dist.rank
        if self.memory is None:
            x1, y = loader.next()  # our slice; every process needs the whole batch
            batch = self._coupled_global_batch(k, _all_gather(x1, self.device), _all_gather(y, self.device))
        elif self._prefetch_pool is None:
            batch = self._coupled_global_batch(k)
        else:
            pool, ahead = self._prefetch_pool, self._prefetched
            fut = ahead[1] if ahead is not None and ahead[0] == k else pool.submit(self._coupled_global_batch, k)
            if ahead is not None and ahead[0] != k:
                ahead[1].cancel()
            self._prefetched = None
            if k + 1 < self.cfg.train.steps * self.cfg.train.grad_accum:  # overlaps with step k
                self._prefetched = (k + 1, pool.submit(self._coupled_global_batch, k + 1))
            batch = fut.result()
        rows = slice(r * B, (r + 1) * B)
        return tuple(v[rows] for v in batch)

    def _start_prefetch(self) -> None:
        if self.coupled and self.memory is not None and self._prefetch_pool is None:
            self._prefetch_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="flowmatch-coupling")

    def _stop_prefetch(self) -> None:
        """Shut the coupling thread down (waits for a running job: milliseconds); drop queued work."""
        pool, self._prefetch_pool, self._prefetched = self._prefetch_pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _micro_step(self, k: int, loader) -> torch.Tensor:
        """Loss of micro-step ``k`` (already divided by grad_accum), backward done by the caller."""
        tc = self.cfg.train
        B, r = tc.batch_size, self.dist.rank
        target = None
        if self.pairs:
            x0, x1, t, y, drop, target = self._pair_batch(k)
        elif self.coupled:
            x0, x1, t, y, drop = self._coupled_batch(k, loader)
        else:
            # All randomness of this micro-step is drawn for the global batch; we take our slice.
            x1, y = self._local_batch(k, loader)
            x0, x1, t, drop = self._pairs(k, x1, slice(r * B, (r + 1) * B))
        self._seed_dropout(k)
        cond = None
        if self.cfg.model.class_cond:
            cond = y.to(self.device).long()
            if tc.label_dropout > 0:
                cond = torch.where(drop.to(self.device), torch.full_like(cond, self.model.null_class), cond)

        if target is None:
            sample = self.path.sample(x0, x1, t)
            x_t, target = sample.x_t, sample.u_t
        else:  # distillation: x1 holds the trajectory state at t, target the segment's secant
            x_t = x1
        with self._autocast():
            v = self.ddp_model(x_t, t, cond)  # (B, *data_shape)
        loss = (v.float() - target).pow(2).mean()
        return loss

    def _seed_dropout(self, k: int) -> None:
        """Seed the default generators (dropout masks) from (seed, k, rank). Only the CPU one, and the
        CUDA one when training there: torch.manual_seed would also queue lazy seeding of every other
        backend, with a stack trace each time (~1 ms per step)."""
        seed = sample_seed(self.cfg.seed * 1000 + _STREAM_STEP, k) + self.dist.rank
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _pair_batch(self, k: int):
        """This process's rows of micro-step ``k`` from a pair store (reflow / distillation).

        ``flow``: the stored noise ``x0`` and sample ``x1 = traj[:, -1]``, times from the time sampler
        (returns target None: the path gives x_t and u_t). ``segments``: a segment ``j`` per row,
        uniform over the K segments, drawn from this step's generator; returns ``x1 = `` the state at
        ``t_j`` and ``target = (state(t_{j+1}) - state(t_j)) / (t_{j+1} - t_j)``.
        """
        B, r = self.cfg.train.batch_size, self.dist.rank
        rows = slice(r * B, (r + 1) * B)
        _, t, _, drop, _ = self._step_draws(k)  # the noise draw is unused: the store holds x0
        x0, traj, y = self.dataset.batch(self.stream.local_indices(k))
        x0, traj = x0.to(self.device), traj.to(self.device)
        drop = drop[rows]
        if self.cfg.train.objective == "flow":
            return x0, traj[:, -1], t[rows].to(self.device), y, drop, None
        times = self.dataset.times
        K = times.numel() - 1
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed * 1000 + _STREAM_SEGMENT, k))
        j = torch.randint(K, (self.global_batch,), generator=g)[rows]
        states = torch.cat([x0[:, None], traj], dim=1)  # (B, K + 1, ...): the state at every time
        ar = torch.arange(states.shape[0])
        start, end = states[ar, j], states[ar, j + 1]
        dt = (times[j + 1] - times[j]).to(device=self.device, dtype=torch.float32)
        target = (end - start) / dt.view(-1, *([1] * (start.ndim - 1)))
        return x0, start, times[j].to(device=self.device, dtype=torch.float32), y, drop, target

    def _train_step(self, loader) -> tuple[float, float]:
        """One optimizer step (with accumulation); returns (loss, grad_norm)."""
        tc = self.cfg.train
        lr = lr_at(self.step, base_lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                   schedule=tc.lr_schedule, min_lr_ratio=tc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            k = self.step * tc.grad_accum + micro
            sync = micro == tc.grad_accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                loss = self._micro_step(k, loader) / tc.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        total = distributed.all_reduce_mean(total)
        loss_value, norm_value = float(total), float(grad_norm)
        if not (math.isfinite(loss_value) and (math.isfinite(norm_value) or self.amp_dtype == torch.float16)):
            raise NonFiniteLossError(
                f"non-finite loss {loss_value} (grad norm {norm_value}) at step {self.step + 1}; "
                f"stopped before the update. The last good checkpoint is "
                f"{self.ckpt_dir / 'latest.pt'} (step <= {self.step}); lower train.lr or check the data")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        decay = 0.0 if self.step <= tc.ema_start_step else self.ema_decay
        self.ema.update(self.model, decay)
        return loss_value, norm_value

    # -- outputs ---------------------------------------------------------------------------------

    def sample_grid(self, path: Path | None = None) -> Path:
        """Samples from the EMA model with fixed noise (comparable across steps) -> a PNG."""
        sc = self.cfg.sample
        n = sc.n if len(self.data_shape) == 3 else max(sc.n, 2000)
        x0 = seeded_noise(range(n), self.data_shape, seed=self.cfg.seed * 1000 + _STREAM_GRID,
                          device=self.device)
        y = None
        if self.cfg.model.class_cond:
            y = torch.arange(n, device=self.device) % self.num_classes
        model = self.ema.model if sc.use_ema else self.model
        settings = resolve_settings(sc)  # the config's sample section, every method (ODE, dpm2m, SDE)
        out = generate_with_settings(model, x0, settings, path=self.path, y=y, indices=range(n),
                                     seed=self.cfg.seed * 1000 + _STREAM_GRID, atol=sc.atol,
                                     rtol=sc.rtol).x.cpu()
        path = path or self.run_dir / "samples" / f"step_{self.step:07d}.png"
        if latent_info(self.dataset) is not None:  # a latent store, or a latent teacher's pairs
            decoded = self._decode_latents(out)
            if decoded is None:  # no VAE here: keep the latents themselves
                path = path.with_suffix(".pt")
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(out, path)
                return path
            out = decoded
        if len(out.shape) == 4:
            nrow = self.num_classes if self.cfg.model.class_cond and self.num_classes <= 16 else None
            upscale = max(1, 128 // out.shape[-1])
            save_image_grid(out, path, nrow=nrow, upscale=upscale)
        elif self.data_shape == (2,):
            ref = self.memory[0][: len(out)] if self.memory is not None else None
            save_scatter(out, path, ref=ref)
        else:
            path = path.with_suffix(".pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out, path)
        return path

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor | None:
        """Images for latent samples through the store's VAE; None (with one warning) if unavailable."""
        if self._autoencoder is None:
            try:
                self._autoencoder = load_autoencoder_for(latent_info(self.dataset), device=self.device)
            except (ImportError, OSError, RuntimeError, ValueError) as e:
                distributed.print0(f"warning: cannot load the VAE {latent_info(self.dataset)['vae']!r} to "
                                   f"decode sample grids ({e}); saving latents instead")
                self._autoencoder = False
        if self._autoencoder is False:
            return None
        return self._autoencoder.decode(z.to(self.device), batch_size=16).cpu()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        steps = [r["step"] for r in self.history]
        save_line_plot({"train loss": (steps, [r["loss"] for r in self.history])},
                       self.run_dir / "loss.png", title=f"{self.cfg.name}: flow-matching loss",
                       logy=True)

    def _record_launch(self) -> None:
        """Append this launch's layout to run.json: processes, batch split, device, start step."""
        path = self.run_dir / "run.json"
        try:
            launches = json.loads(path.read_text())["launches"] if path.is_file() else []
        except (json.JSONDecodeError, KeyError, TypeError):
            launches = []
        launches.append({
            "start_step": self.step, "time": time.time(), "world_size": self.dist.world_size,
            "batch_size_per_process": self.cfg.train.batch_size,
            "grad_accum": self.cfg.train.grad_accum, "global_batch": self.images_per_step,
            "device": self.device.type, "torch": torch.__version__,
        })
        path.write_text(json.dumps({"launches": launches}, indent=1) + "\n")

    def _load_history(self) -> None:
        """Keep the metric lines up to the resumed step (later ones belong to lost work)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= self.step:
                keep.append(rec)
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.history = keep

    # -- the loop --------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        distributed.print0("\ninterrupt: finishing this step, writing a checkpoint, then exiting "
                           "(Ctrl-C again to abort without saving)")

    def fit(self) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self._try_resume()
        if self.dist.is_main:
            self._load_history()
            self._record_launch()
            distributed.print0(self.describe())
        loader = None
        if self.memory is None and not self.pairs:
            loader = _LoaderFromStream(self.dataset, self.stream, self.step * tc.grad_accum,
                                       tc.num_workers)

        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc=cfg.name, dynamic_ncols=True)
        status, loss, t_last, step_last = "finished", float("nan"), time.perf_counter(), self.step
        loss_sum = 0.0  # the logged loss is the mean over the steps since the last log line
        self.model.train()
        try:
            self._start_prefetch()  # the coupling of the next micro-step, in a background thread
            while self.step < tc.steps:
                loss, grad_norm = self._train_step(loader)
                loss_sum += loss
                if bar is not None:
                    bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    speed = (self.step - step_last) * self.images_per_step / max(now - t_last, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    mean_loss = loss_sum / (self.step - step_last)
                    t_last, step_last, loss_sum = now, self.step, 0.0
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                    if self.dist.is_main:
                        self._log({"step": self.step, "loss": mean_loss, "last_loss": loss, "lr": lr,
                                   "grad_norm": grad_norm, "samples_per_s": speed,
                                   "time": time.time()})
                if tc.sample_every and self.step % tc.sample_every == 0 and self.dist.is_main:
                    self.sample_grid()
                keep = bool(tc.keep_every) and self.step % tc.keep_every == 0
                if (tc.save_every and self.step % tc.save_every == 0) or keep:
                    self.save(keep=keep)
                stop = torch.tensor(float(self._stop_requested))
                if self.dist.distributed:
                    stop = distributed.all_reduce_sum(stop.to(self.device)).cpu()
                if stop.item() > 0 and self.step < tc.steps:
                    status = "interrupted"
                    break
        finally:
            self._stop_prefetch()
            if bar is not None:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        self.save(keep=bool(tc.keep_every) and status == "finished")
        if status == "finished" and self.dist.is_main:
            final = self.sample_grid(self.run_dir / "samples.png")
            distributed.print0(f"done: {self.step} steps; samples {final}; loss curve "
                               f"{self.run_dir / 'loss.png'}; checkpoint {self.ckpt_dir / 'latest.pt'}")
        elif status == "interrupted":
            distributed.print0(f"interrupted at step {self.step}; checkpoint written to "
                               f"{self.ckpt_dir / 'latest.pt'}; run the same command to resume")
        return TrainResult(step=self.step, status=status, run_dir=self.run_dir, last_loss=loss)
