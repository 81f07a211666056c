"""Calibration: feeding data through a model and collecting activation statistics."""
