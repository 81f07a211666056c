"""Errors that onnxq reports to users.

`OnnxqError` and its subclasses are *user* errors: bad input, a mismatched
statistics file, an unknown target.  The CLI prints their message on one line
and exits with code 2.  Anything else is an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = ["OnnxqError", "ModelLoadError", "CalibrationDataError", "StatsMismatchError"]


class OnnxqError(Exception):
    """A user-facing error with a one-line message."""


class ModelLoadError(OnnxqError):
    """The model file or folder cannot be read."""


class CalibrationDataError(OnnxqError):
    """Calibration data is missing, unreadable or does not fit the model."""


class StatsMismatchError(OnnxqError):
    """A statistics file does not belong to the graph it is applied to."""
