"""Progress for people and for log files: a tqdm bar on a terminal, plain lines anywhere else.

tqdm redraws its bar with carriage returns; written to a file (a SLURM log, ``make demo > log 2>&1``)
that is one line of tens of kilobytes nobody can read. So ``progress_bar`` gives a tqdm bar only when
its stream is a terminal; otherwise a ``LineProgress``, with the part of tqdm's interface our loops use
(``update``, ``n``, ``refresh``, ``set_postfix``/``postfix``, ``write``, ``close``, a context manager),
prints one plain line at most every ``every`` seconds, as timm's train.py logs, and one at the end:

    precompute: 1200/4800 views (25%) 310.2 view/s ETA 0:00:11

A leaf module (tqdm and the standard library only): both stages import it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

DEFAULT_EVERY = 15.0  # seconds between lines in a log: a day-long run writes ~6k lines, a short one a few


def progress_bar(total: int | None, desc: str, unit: str = "it", *, disable: bool = False,
                 every: float = DEFAULT_EVERY, file: TextIO | None = None, **tqdm_kwargs):
    """A tqdm bar when ``file`` (default: stderr, where tqdm writes) is a terminal, else a ``LineProgress``.

    ``tqdm_kwargs`` (``dynamic_ncols``, ``smoothing``, ...) shape the terminal bar only."""
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=file, **tqdm_kwargs)
    return LineProgress(total, desc, unit, disable=disable, every=every, file=file)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's small interface, printed as one line per ``every`` seconds (at the first update, then at
    most every ``every`` seconds, then at ``close``). The rate on a line is over the time since the line
    before, so a resumed run's first jump (the work already done) never inflates it; ``clock`` is
    injectable for tests."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, disable: bool = False,
                 every: float = DEFAULT_EVERY, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.disable, self.every = total, desc, unit, disable, every
        self.file, self.clock = file, clock
        self.n = 0
        self.postfix = ""
        self.closed = False
        self.start = clock()
        self._first: tuple[float, int] | None = None  # (time, n) of the first line printed
        self._last: tuple[float, int] | None = None  # ... and of the last

    # ---- tqdm's interface ------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        """Print a line if none was printed yet or the last is ``every`` seconds old (tqdm: redraw)."""
        if self._last is None or self.clock() - self._last[0] >= self.every:
            self._print_line(final=False)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """``key=value`` pairs shown at the end of the next line (tqdm's format: ``loss=0.1, lr=1e-3``)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, s: str) -> None:
        if not self.disable:
            print(s, file=self._file(), flush=True)

    def close(self) -> None:
        """The last line (the count reached, the mean rate, the time taken), once; none if nothing moved since."""
        if self.closed:
            return
        self.closed = True
        if self.n != (self._last[1] if self._last is not None else 0):
            self._print_line(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- the line ----------------------------------------------------------------------------
    def format_line(self, now: float, final: bool) -> str:
        """``desc: n/total units (p%) rate unit/s ETA h:mm:ss, postfix``; the last line gives the mean rate since
        the first line and the time taken instead of an ETA."""
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.desc}: {self.n} {self.unit}s"]
        if self._last is not None:  # the first line has no interval to measure a rate over
            since_t, since_n = self._first if final else self._last
            rate = (self.n - since_n) / (now - since_t) if now > since_t else None
            parts.append(f"{'-' if rate is None else f'{rate:.1f}'} {self.unit}/s")
            if final:
                parts[-1] += f", {_clock(now - self.start)} in all"
            elif rate and self.total and self.n < self.total:
                parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        return " ".join(parts) + (f", {self.postfix}" if self.postfix else "")

    def _print_line(self, final: bool) -> None:
        now = self.clock()
        if not self.disable:
            print(self.format_line(now, final), file=self._file(), flush=True)
        self._last = (now, self.n)
        self._first = self._first or self._last

    def _file(self) -> TextIO:
        return sys.stderr if self.file is None else self.file


def _clock(seconds: float) -> str:
    """H:MM:SS, as tqdm and timm print durations."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
