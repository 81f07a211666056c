"""Fidelity metrics, per-layer error and reports."""
