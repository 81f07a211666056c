"""Stage timing and progress bars: visible on a terminal, silent in pipelines."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from onnxq import _interrupt

__all__ = ["Progress"]


class Progress:
    """Times named stages; shows bars with ETA when stderr is a terminal.

    Args:
        verbosity: 0 = quiet, 1 = normal (stage lines only on a terminal), 2 = verbose
            (stage lines always, with timings).
        interactive: draw progress bars; default: stderr is a terminal.
    """

    def __init__(self, verbosity: int = 1, interactive: bool | None = None) -> None:
        self.verbosity = verbosity
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.timings: dict[str, float] = {}

    def _say(self, text: str) -> None:
        if self.verbosity >= 2 or (self.verbosity >= 1 and self.interactive):
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _interrupt.check()
        self._say(f"onnxq: {name} ...")
        t0 = time.perf_counter()
        done = False
        try:
            yield
            _interrupt.check()
            done = True
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            # A failed or interrupted stage is not "done": the error line says what happened.
            if done and self.verbosity >= 2:
                print(f"onnxq: {name} done in {dt:.1f} s", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, desc: str, total: int | None, unit: str = "sample"):
        """Yield an ``update(n)`` callable; a tqdm bar on terminals, a no-op otherwise."""
        if not self.interactive or self.verbosity < 1:
            yield lambda n=1: None
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            yield lambda n=1: None
            return
        with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr) as pbar:
            yield pbar.update
