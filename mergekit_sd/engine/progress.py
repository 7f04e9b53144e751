"""Progress on a terminal (per step and per tensor, with bytes per second and time left); silent in pipes and
with --quiet. Bars are drawn by tqdm, which keeps rates and ETAs smoothed and redraws at a bounded rate."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar: tqdm | None = None
        self._step: str | None = None
        self._last = 0.0  # when bytes_callback last drew

    def line(self, text: str) -> None:
        """A durable message (step started, built, fresh); shown unless quiet."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        if self._bar is not None:
            self._bar.refresh()

    def step_done(self, step: str, computed: int, reused: int) -> None:
        """The end of a built step: how many tensors its op produced and how many were copied from the store."""
        self.close()
        self.line(f"{step}: {computed} computed, {reused} reused")

    def warn(self, text: str) -> None:
        """Warnings are shown even in pipes; --quiet hides them too."""
        self.line(f"warning: {text}")

    def bytes_callback(self, label: str) -> Callable[[int], None]:
        """A callback for transfers that report bytes as they move; draws `label 12.3 MiB` on terminals."""
        moved = [0]

        def on_bytes(n: int) -> None:
            moved[0] += n
            if not self.live:
                return
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self.stream.write(f"\r\x1b[2K  {label} {moved[0] / 2**20:.1f} MiB")
                self.stream.flush()

        return on_bytes

    def tensor(self, step: str, done: int, total: int, name: str, nbytes: int = 0, total_bytes: int = 0) -> None:
        """One tensor of a step written: a transient bar with bytes/s and ETA (terminals only)."""
        if not self.live:
            return
        if self._bar is None or self._step != step:
            self.close()
            self._step = step
            self._bar = tqdm(total=total_bytes or total, unit="B" if total_bytes else "tensor", unit_scale=bool(total_bytes),
                             unit_divisor=1024, desc=f"  {step}", file=self.stream, leave=False, dynamic_ncols=True,
                             mininterval=0.1, bar_format="{desc} {percentage:3.0f}%|{bar}| " + (
                                 "{n_fmt}B/{total_fmt}B" if total_bytes else "{n_fmt}/{total_fmt}") + " [{rate_fmt}, {remaining} left]{postfix}")
        self._bar.update(nbytes if total_bytes else 1)
        self._bar.set_postfix_str(name[-40:], refresh=False)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._step = None
