"""The parts every training loop here shares: one optimizer update, checkpoints, the metrics log,
Ctrl-C, the progress bar, mixed precision.

:class:`Learner` holds what an update changes (network, optimizer, EMA copy, AMP grad scaler, step
count) and does one update; :class:`Checkpoints` writes and reads a run's ``checkpoints/``;
:class:`MetricsLog` keeps ``metrics.jsonl`` (cut back to the resumed step on restart),
:class:`TensorBoardLog` the same numbers and the sample grids as TensorBoard events (opt-in);
:class:`StopOnInterrupt` turns the first Ctrl-C into "finish this step, save, stop". The flow
:class:`~flowmatch.training.trainer.Trainer` and the VAE fine-tuning
(:mod:`flowmatch.training.vae`) are both built from them.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from flowmatch import distributed
from flowmatch.atomic import atomic_open
from flowmatch.checkpoint import load_checkpoint, save_checkpoint
from flowmatch.plots import save_line_plot
from flowmatch.progress import Progress
from flowmatch.training.ema import EMA

__all__ = [
    "NonFiniteLossError",
    "UpdateRule",
    "Learner",
    "Checkpoints",
    "MetricsLog",
    "TensorBoardLog",
    "StopOnInterrupt",
    "progress_bar",
    "stop_status",
    "record_launch",
    "amp_dtype",
    "autocast",
]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; training stopped before the optimizer step."""


# ----------------------------------------------------------------------------------------------
# One update
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRule:
    """How one optimizer step goes."""

    lr: Callable[[int], float]  # step -> learning rate, e.g. an LRSchedule
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 0.0  # max global gradient norm; 0: no clipping
    ema_decay: float = 0.0
    ema_start_step: int = 0  # up to this step the EMA copies the weights (decay 0)


class Learner:
    """The network, its optimizer, its EMA copy, the AMP grad scaler and the step count: what one
    update changes and what a checkpoint holds.

    Args:
        model: the network (its parameters are those of ``optimizer``, which are clipped).
        optimizer, ema: its optimizer and :class:`EMA` copy.
        rule: the update's settings.
        ddp_model: the DistributedDataParallel wrapper of ``model``, if any (``loss_of`` calls it).
        scaler: a ``torch.amp.GradScaler`` (fp16); None: no scaling, none in the checkpoint.
        model_key: the key of the network's weights in :meth:`state_dict`.
        checkpoint: the resume point named when a non-finite loss stops training.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, rule: UpdateRule,
                 *, ddp_model: nn.Module | None = None, scaler: torch.amp.GradScaler | None = None,
                 model_key: str = "model", checkpoint: Path | None = None):
        self.model, self.optimizer, self.ema, self.rule = model, optimizer, ema, rule
        self.ddp_model = ddp_model if ddp_model is not None else model
        self.saves_scaler = scaler is not None
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.model_key, self.checkpoint = model_key, checkpoint
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.step = 0

    def train_step(self, loss_of: Callable[[int], Tensor]) -> tuple[float, float]:
        """One optimizer step; ``loss_of(k)`` is the loss of micro-step ``k = step * grad_accum + i``.
        Returns (loss averaged over micro-steps and processes, gradient norm before clipping)."""
        rule = self.rule
        for group in self.optimizer.param_groups:
            group["lr"] = rule.lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.params[0].device)
        for micro in range(rule.grad_accum):
            last = micro == rule.grad_accum - 1
            # DDP: all-reduce the gradients once, on the last micro-step
            sync = last or not isinstance(self.ddp_model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                loss = loss_of(self.step * rule.grad_accum + micro) / rule.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = rule.grad_clip if rule.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss_value, norm_value = float(distributed.all_reduce_mean(total)), float(grad_norm)
        # with fp16 loss scaling an inf gradient is expected now and then: the scaler skips that step
        if not (math.isfinite(loss_value) and (math.isfinite(norm_value) or self.scaler.is_enabled())):
            raise NonFiniteLossError(
                f"non-finite loss {loss_value} (grad norm {norm_value}) at step {self.step + 1}; "
                f"stopped before the update. The last good checkpoint is {self.checkpoint} "
                f"(step <= {self.step}); lower the learning rate or check the data")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.ema.update(self.model, 0.0 if self.step <= rule.ema_start_step else rule.ema_decay)
        return loss_value, norm_value

    def state_dict(self) -> dict:
        """Network, EMA, optimizer (and scaler) state; the caller adds the step and its own facts."""
        state = {self.model_key: self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        if self.saves_scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state[self.model_key])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.saves_scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` (no | bf16 | fp16 | auto) on ``device``; None: float32.
    Only CUDA autocasts; elsewhere a note says the run stays in float32."""
    if device.type != "cuda" or mode == "no":
        if mode in ("bf16", "fp16") and device.type != "cuda":
            distributed.print0(f"note: train.mixed_precision={mode} needs CUDA; training in fp32")
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    """``torch.autocast`` to ``dtype``, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Run directory: checkpoints, metrics
# ----------------------------------------------------------------------------------------------


class Checkpoints:
    """``folder/latest.pt`` (the resume point) and numbered snapshots ``folder/step_XXXXXXX.pt``,
    written atomically (:func:`flowmatch.checkpoint.save_checkpoint`)."""

    def __init__(self, folder: Path, require: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.latest = self.folder / "latest.pt"
        self.require = tuple(require)  # keys a readable latest.pt must hold (CheckpointError otherwise)

    def write(self, state: dict, snapshot: bool = False) -> None:
        """Write ``state`` (which holds its ``"step"``) as latest.pt, and as a snapshot if asked."""
        save_checkpoint(state, self.latest)
        if snapshot:
            save_checkpoint(state, self.folder / f"step_{state['step']:07d}.pt")

    def read(self, device: torch.device | str = "cpu") -> dict | None:
        """The latest state, or None when there is none."""
        if not self.latest.is_file():
            return None
        return load_checkpoint(self.latest, map_location=device, require=self.require)


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line; with ``plot``, the loss curve drawn after each."""

    def __init__(self, path: Path, plot: Path | None = None, title: str = ""):
        self.path, self.plot, self.title = Path(path), plot, title
        self.records: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep the lines up to ``step`` (later ones belong to work lost when the run stopped)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", 0) <= step:
                keep.append(record)
        with atomic_open(self.path, "w") as f:  # a kill now must not lose the kept lines
            f.write("".join(json.dumps(r) + "\n" for r in keep))
        self.records = keep

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.plot is not None:
            steps = [r["step"] for r in self.records]
            save_line_plot({"train loss": (steps, [r["loss"] for r in self.records])}, self.plot,
                           title=self.title, logy=True)


class TensorBoardLog:
    """TensorBoard event files in ``folder`` (``train.log.tensorboard: true``; the extra
    ``flowmatch[tensorboard]``): each metrics record's numbers as scalars ``train/<key>`` at its
    step, and sample grids (PNG files) as images. Written by one process (rank 0) beside
    ``metrics.jsonl``, flushed after every write (a killed run keeps what was logged).

    ``purge_step``: the first step this launch logs. TensorBoard hides the events of earlier launches
    from that step on (the work lost when the run stopped), as :meth:`MetricsLog.resume` cuts its
    lines; later events append to the same folder.
    """

    INSTALL = "pip install 'flowmatch[tensorboard]'"

    def __init__(self, folder: Path, purge_step: int | None = None):
        writer = self.require()
        self.folder = Path(folder)
        self.writer = writer(log_dir=str(self.folder), purge_step=purge_step)
        self._images: set[tuple[str, int]] = set()  # (tag, step) written by this launch

    @classmethod
    def require(cls):
        """``torch.utils.tensorboard.SummaryWriter``; ImportError naming the extra if missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.log.tensorboard: the tensorboard package is not installed; "
                              f"{cls.INSTALL} (or set train.log.tensorboard: false)") from None
        return SummaryWriter

    def scalars(self, record: dict) -> None:
        """Every number of ``record`` except ``step`` and ``time``, at ``record["step"]``."""
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.writer.flush()

    def image(self, tag: str, file: Path, step: int) -> None:
        """The PNG ``file`` as image ``tag`` at ``step`` (anything else, e.g. a ``.pt`` of latents,
        is skipped; so is a second image of one tag at one step)."""
        if Path(file).suffix != ".png" or (tag, step) in self._images:
            return
        import numpy as np
        from PIL import Image

        with Image.open(file) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()
        self._images.add((tag, step))

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------------------------
# Ctrl-C and progress
# ----------------------------------------------------------------------------------------------


class StopOnInterrupt:
    """Inside ``with``: the first Ctrl-C (SIGINT) or SIGTERM -- what SLURM, Kubernetes and torchrun
    send before they kill a job -- sets ``requested`` and ``signal``: the loop finishes its step,
    writes a checkpoint and stops. A second signal raises ``KeyboardInterrupt`` at once. Signals can
    only be handled in the main thread: elsewhere this does nothing. The old handlers come back on
    exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        what = "interrupt" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
        distributed.print0(f"\n{what}: finishing this step, writing a checkpoint, then exiting "
                           "(send it again to abort without saving)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def stop_status(interrupt: StopOnInterrupt, device: torch.device) -> str | None:
    """How every process should stop after this step: ``"terminated"`` if any process got SIGTERM,
    ``"interrupted"`` if any got SIGINT, None to go on (a collective: every process must call it)."""
    votes = torch.tensor([float(interrupt.signal == signal.SIGTERM),
                          float(interrupt.signal == signal.SIGINT)])
    if distributed.info().distributed:
        votes = distributed.all_reduce_sum(votes.to(device)).cpu()
    if votes[0] > 0:
        return "terminated"
    return "interrupted" if votes[1] > 0 else None


def record_launch(path: Path, record: dict) -> None:
    """Append ``record`` (this launch's layout: processes, batch split, device, start step) to the
    ``launches`` list of the JSON file ``path``."""
    try:
        launches = json.loads(path.read_text())["launches"] if path.is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        launches = []
    launches.append(record)
    path.write_text(json.dumps({"launches": launches}, indent=1) + "\n")


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Progress:
    """The progress of a training loop in optimizer steps (:class:`flowmatch.progress.Progress`: a
    bar on a terminal, a line per interval elsewhere, nothing when not ``enabled``)."""
    return Progress(total, desc, unit="steps", initial=initial, enabled=enabled)
