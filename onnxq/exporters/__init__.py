"""Export of Hugging Face models to float32 ONNX graphs (needs the ``export`` extra: torch, transformers)."""

from __future__ import annotations

from onnxq.exporters.hf import (
    DEFAULT_MODEL,
    SUPPORTED_MODEL_TYPES,
    TASKS,
    ExportResult,
    default_model_dir,
    export_hf,
    resolve_model_source,
)

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "ExportResult",
    "default_model_dir",
    "export_hf",
    "resolve_model_source",
]
