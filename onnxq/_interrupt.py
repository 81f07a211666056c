"""Remembers that the user interrupted the run (SIGINT/SIGTERM in the CLI).

The CLI's signal handler raises KeyboardInterrupt, but Python runs a handler at
whatever bytecode the main thread executes next; if that is a finalizer or a
weakref callback the exception is reported as "ignored" and the run would go on.
The handler therefore also records the request here, and every stage boundary
(:class:`onnxq._progress.Progress`) and the atomic output rename
(:func:`onnxq.io.atomic_output`) call :func:`check`: an interrupted run never
writes its output.
"""

from __future__ import annotations

__all__ = ["check", "clear", "request", "requested"]

_requested = False


def request() -> None:
    """Record an interrupt request."""
    global _requested
    _requested = True


def requested() -> bool:
    """True once :func:`request` was called (until :func:`clear`)."""
    return _requested


def clear() -> None:
    """Forget a recorded request (for tests and long-lived processes)."""
    global _requested
    _requested = False


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested."""
    if _requested:
        raise KeyboardInterrupt
