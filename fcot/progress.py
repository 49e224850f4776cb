"""Progress of a long stage, one rule for all of them (teacher, curation, training, evaluation).

On a terminal: a tqdm bar with rate and ETA. Anywhere else (`fcot submit`'s job logs, a Ray worker's output that
Ray forwards, a file): one plain line every LINE_EVERY_S seconds and one at the end, so a log shows how far a stage
is, how fast it goes and when it ends, without a line per update:

    [train] 120/360 steps (33%), 410 steps/min, tokens_per_s=1234, ETA 35s
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`with Progress("teacher", total, "samples") as p: p.update(n, tok_s=...)`; `p.total` may grow."""

    def __init__(self, stage: str, total: int, unit: str, enabled: bool = True, stream=None,
                 every_s: float = LINE_EVERY_S, done: int = 0):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > done
        self.done, self.resumed_at, self.postfix = done, done, {}  # resumed: the rate counts this run's work
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm  # a terminal only

            self.bar = tqdm(total=total, initial=done, unit=unit.rstrip("s"), desc=f"[{stage}]", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.resumed_at) / max(elapsed, 1e-9)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"[{self.stage}] {self.done}/{self.total} {self.unit}{share}, {60 * rate:.0f} {self.unit}/min"
        text += "".join(f", {k}={v}" for k, v in self.postfix.items())
        left = self.total - self.done
        return text + (f", ETA {_duration(left / rate)}" if left > 0 and rate > 0 else f", {_duration(elapsed)}")

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()  # the last line: what was done and in how long
        self.enabled = False
