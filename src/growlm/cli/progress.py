"""Progress a person can follow, for every long piece of work the CLI runs (training, tokenising a corpus,
evaluation). The one implementation `growlm train`, `growlm eval` and `growlm report --eval` share.

- Output is a terminal: rich bars with done/total, rate, elapsed time and ETA (transient: they vanish
  when their work is done, so what stays on screen is the log and the tables).
- Output is not a terminal (CI, a file): no bar, no carriage return, no escape code; a plain line
  `wikitext | 12/40 windows | 3.1 windows/s | elapsed 4s | eta 9s` when a piece of work starts, at most
  every `every_s` seconds while it runs, and at its end.

The library reports progress through `progress(done, total)` callbacks (`growlm.eval`, `growlm.train.data`)
or the trainer's `on("progress", ...)`; only this module turns them into output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def make_console() -> Console:
    """A console for stdout; wide lines when stdout is a file, so log lines are not wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=150)


def hms(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class _Work:
    bar: TaskID
    t0: float  # when the work started (the clock of its rate, elapsed time and ETA)
    last_line: float  # when its last plain line was written


class ProgressDisplay:
    """Bars under a terminal, periodic plain lines otherwise (see the module docstring).

    Use as a context manager around the work; `update(name, done, total, unit)` from the progress callbacks,
    `print(text)` for lines that must not tear a bar. `enabled=False` (a non-zero rank) shows nothing.
    """

    def __init__(self, console: Console, enabled: bool = True, every_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.console = console
        self.live = enabled and console.is_terminal
        self.plain = enabled and not console.is_terminal
        self.every_s = every_s
        self.clock = clock
        self.progress = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>14}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console, transient=True, disable=not self.live)
        self._work: dict[str, _Work] = {}

    def __enter__(self) -> ProgressDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def update(self, name: str, done: int, total: int, unit: str, rate: str | None = None, log: bool = True) -> None:
        """`name` has done `done` of `total` `unit`s. `rate`: the bar's rate text (default: `unit`s per second
        since the work started). `log=False`: no plain line (the caller logs this work its own way). When
        done reaches total the work ends: its bar is hidden and the next update of `name` starts a new clock."""
        now = self.clock()
        w = self._work.get(name)
        new = w is None
        if w is None:
            w = self._work[name] = _Work(self.progress.add_task(name, total=total, rate=""), now, now)
        elapsed = now - w.t0
        if rate is None:
            rate = f"{done / elapsed:,.1f} {unit}/s" if elapsed > 0 and done > 0 else ""
        finished = done >= total
        # drawn at once when new (else at the next 10 Hz refresh): the bar shows the moment the work starts
        self.progress.update(w.bar, completed=done, total=total, rate=rate, visible=not finished,
                             refresh=new and not finished)
        if self.plain and log and (new or finished or now - w.last_line >= self.every_s):
            w.last_line = now
            self.print(self.line(name, done, total, unit, rate, elapsed))
        if finished:
            self.progress.remove_task(w.bar)
            del self._work[name]

    @staticmethod
    def line(name: str, done: int, total: int, unit: str, rate: str, elapsed: float) -> str:
        """`wikitext | 12/40 windows | 3.1 windows/s | elapsed 4s | eta 9s` (ETA: elapsed / done x left)."""
        eta = elapsed / done * (total - done) if done > 0 else None
        parts = [name, f"{done:,}/{total:,} {unit}"] + ([rate] if rate else [])
        parts.append(f"elapsed {hms(elapsed)}" + ("" if eta is None else f" | eta {hms(eta)}"))
        return " | ".join(parts)

    def parts(self, labels: Sequence[tuple[str, str]]) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback for work made of consecutive parts (the tasks of one
        `growlm.eval.evaluate` call), each counting from 0 to its own total: part k shows as labels[k] =
        (name, unit), and a call after a part reached its total belongs to the next part."""
        k, ended = 0, False

        def on(done: int, total: int) -> None:
            nonlocal k, ended
            if ended:
                k, ended = min(k + 1, len(labels) - 1), False
            name, unit = labels[k]
            self.update(name, done, total, unit)
            ended = done >= total

        return on
