"""Target profiles (what a deployable graph looks like per runtime) and their lint rules."""

from __future__ import annotations

from onnxq.targets.profiles import TARGETS, TargetProfile, get_target

__all__ = ["TARGETS", "TargetProfile", "get_target"]
