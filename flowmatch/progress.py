"""Progress of a long job (training, sampling to a folder, encoding latents, FID, NLL, teacher
trajectories, VAE fine-tuning), shown one of three ways by :class:`Progress`:

* on a terminal: a tqdm bar with the rate and the ETA, redrawn in place;
* elsewhere (a CI log, a SLURM output file, a pipe): one plain line every ``interval`` seconds
  (default 30, or ``$FLOWMATCH_PROGRESS_INTERVAL``), e.g.
  ``train: 1200/6000 steps (20%), 85.2 steps/s, ETA 0:00:56, loss=0.0412``, and a last line at the
  end when the job ran long enough to print one before;
* nothing, when disabled (``--no-progress``, or a process other than rank 0).

Everything goes to stderr: stdout is left to a command's results (``eval nll`` prints JSON there).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "INTERVAL_ENV", "DEFAULT_INTERVAL_S", "interval_from_env"]

INTERVAL_ENV = "FLOWMATCH_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def interval_from_env() -> float:
    """Seconds between two plain progress lines: ``$FLOWMATCH_PROGRESS_INTERVAL``, else 30."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{INTERVAL_ENV}: expected a number of seconds > 0, got {value!r}")
    return seconds


def _clock_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))  # 0:00:56


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts work done out of ``total`` and shows it (a bar, plain lines, or nothing; see the
    module's docstring). A context manager; ``update``, ``set_postfix``, ``close`` and ``n`` as in
    tqdm, so a loop reads the same whichever way it is shown.

    Args:
        total: units of work in the whole job.
        desc: what the job is (the line's or bar's prefix).
        unit: the unit counted, plural (``"steps"``, ``"images"``).
        initial: units already done (a resumed job); the rate counts only this launch's work.
        enabled: False shows nothing.
        stream: where to write (default ``sys.stderr``); a terminal gets the bar.
        interval: seconds between plain lines (default :func:`interval_from_env`).
        clock: seconds, monotonic (a test injects its own).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.initial = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval if interval is not None else interval_from_env()
        self.mode = "off" if not enabled else ("bar" if _is_terminal(self.stream) else "lines")
        self._clock = clock
        self._start = self._last_line = clock()
        self._lines = 0  # plain lines written
        self._postfix: dict[str, object] = {}
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit,
                             file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = self._clock()
            if now - self._last_line >= self.interval:
                self._write(self.line(now))
                self._last_line = now

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (the latest loss, say) until replaced."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        """End the display: the bar stays drawn; plain lines end with a last one if any was
        written (a short job prints none). Closing twice does nothing more."""
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._lines:
            self._write(self.line(self._clock()))
        self.mode, self._bar = "off", None

    def line(self, now: float | None = None) -> str:
        """The plain progress line at time ``now`` (default: the clock's)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        rate_text = f"{rate:.2f}" if rate < 10 else f"{rate:.1f}"
        if self.total > 0 and self.n >= self.total:
            when = f"done in {_clock_text(elapsed)}"
        elif rate > 0:
            when = f"ETA {_clock_text((self.total - self.n) / rate)}"
        else:
            when = "ETA ?"
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate_text} {self.unit}/s, {when}"
        return text + "".join(f", {k}={v}" for k, v in self._postfix.items())

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._lines += 1
