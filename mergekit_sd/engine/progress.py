"""Progress on a terminal (per step and per tensor); silent in pipes and with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def line(self, text: str) -> None:
        """A durable message (step started, built, fresh); shown unless quiet."""
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

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

    def tensor(self, step: str, done: int, total: int, name: str) -> None:
        """A transient per-tensor bar, redrawn at most ten times a second, terminals only."""
        if not self.live:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        fill = int(width * done / max(total, 1))
        bar = "#" * fill + "." * (width - fill)
        self.stream.write(f"\r\x1b[2K  {step} [{bar}] {done}/{total} {name[-48:]}")
        if done >= total:
            self.stream.write("\r\x1b[2K")
        self.stream.flush()
