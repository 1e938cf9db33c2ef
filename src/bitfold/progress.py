"""Progress with an ETA for work that takes more than a couple of seconds (loading weights,
quantizing them), on stderr: a tqdm bar on a terminal, a plain line every few seconds anywhere
else (a log file, a pipe, a service manager), so a long load is never silent. Nothing at all is
shown for work done within `DELAY_S`.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

DELAY_S = 2.0  # show nothing for work shorter than this
LINE_EVERY_S = 10.0  # a line this often when stderr is not a terminal


class LineProgress:
    """tqdm's interface (update / close / context manager) for a log: one whole line with the
    rate and the time left every `every` seconds once `delay` has passed, and a last line at the
    end if any was written."""

    def __init__(self, total: float, desc: str, unit: str, unit_scale: bool, file: IO[str],
                 delay: float = DELAY_S, every: float = LINE_EVERY_S):
        self.total, self.desc, self.unit, self.unit_scale, self.file = total, desc, unit, unit_scale, file
        self.delay, self.every = delay, every
        self.n = 0
        self.start = time.monotonic()
        self.last: float | None = None  # when the last line was written

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.start >= self.delay and (self.last is None or now - self.last >= self.every):
            self._line(now)

    def _line(self, now: float) -> None:
        meter = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                  unit_scale=self.unit_scale, ncols=0)
        self.file.write(f"[bitfold] {meter}\n")
        self.file.flush()
        self.last = now

    def close(self) -> None:
        if self.last is not None:
            self._line(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: float, desc: str, unit: str = "B", unit_scale: bool = True, file: IO[str] | None = None,
             delay: float | None = None, every: float | None = None):
    """A progress counter over `total` units: use as a context manager and call `update(n)`.
    `delay` and `every` default to DELAY_S and LINE_EVERY_S."""
    file = file or sys.stderr
    delay = DELAY_S if delay is None else delay
    every = LINE_EVERY_S if every is None else every
    if getattr(file, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=file, delay=delay, leave=False)
    return LineProgress(total, desc, unit, unit_scale, file, delay=delay, every=every)
