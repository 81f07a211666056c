"""Export Hugging Face ViT / DeiT image classifiers to float32 ONNX graphs (task image-classification).

The graph follows the conventions of :mod:`onnxq.exporters.hf`:

* one input ``pixel_values`` float32 ``[batch, 3, H, W]`` (``batch`` dynamic; H and W
  fixed to ``config.image_size``, the size the position embeddings were trained for);
* one output ``logits`` ``[batch, num_labels]`` (for ``DeiTForImageClassificationWithTeacher``
  the model's own ``logits``: the mean of the class-token and distillation heads);
* every node carries ``metadata_props["onnxq.module"]`` / ``["onnxq.module_type"]``
  (transformers 5 names: ``vit.layers.N.attention.q_proj``, ``vit.layers.N.mlp.fc1``,
  ``vit.layers.N.layernorm_before`` ...), initializers carry PyTorch names;
* ``model.metadata_props``: ``onnxq.source``, ``onnxq.task=image-classification``,
  ``onnxq.model_type`` and ``onnxq.image_processor`` (absolute folder that holds
  ``preprocessor_config.json``, when the model has one).

Eager attention is used (plain MatMul → Softmax → MatMul chain).  Every export is
checked once in onnxruntime against PyTorch on a batch size other than the traced one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from onnxq.errors import ModelLoadError, OnnxqError
from onnxq.exporters.hf import (
    open_export_source,
    _WRAPPER_ATTR,
    ExportResult,
    _one_line,
    _quiet,
    _say,
    _source_name,
    _tidy_graph,
    _validate,
)

__all__ = ["SUPPORTED_VIT_TYPES", "TASK", "export_vit", "is_vit_config"]

TASK = "image-classification"
OUTPUT_NAME = "logits"
INPUT_NAME = "pixel_values"

SUPPORTED_VIT_TYPES: tuple[str, ...] = ("vit", "deit")
"""``config.model_type`` values this exporter handles."""

_ARCHITECTURES = {
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
}


def is_vit_config(config: dict[str, Any]) -> bool:
    """True for a ViT/DeiT config (what the dispatcher should send here)."""
    return str(config.get("model_type", "")) in SUPPORTED_VIT_TYPES


def _load(folder, config: dict[str, Any]) -> Any:
    import torch
    import transformers

    architectures = [str(a) for a in config.get("architectures") or []]
    name = next((a for a in architectures if a in _ARCHITECTURES), None)
    if name is None:
        name = ("ViTForImageClassification" if config.get("model_type") == "vit"
                else "DeiTForImageClassificationWithTeacher"
                if any("WithTeacher" in a for a in architectures)
                else "DeiTForImageClassification")
    model_class = getattr(transformers, name)
    try:
        model = model_class.from_pretrained(
            str(folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model in {folder}: {_one_line(exc)}") from exc
    model.eval()
    return model


def _make_wrapper(model: Any) -> Any:
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, _WRAPPER_ATTR, inner)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = getattr(self, _WRAPPER_ATTR)(pixel_values=pixel_values, return_dict=True)
            return out.logits

    return _Wrapper(model)


def _pixels(batch: int, channels: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(batch, channels, size, size)).astype(np.float32)


def export_vit(
    source: str | os.PathLike[str] | None, *, opset: int = 21, progress: bool = False
) -> ExportResult:
    """Export a ViT/DeiT image classifier to a float32 ONNX graph and check it in onnxruntime.

    Args:
        source: A Hugging Face folder (config.json + weights) or an installed package
            carrying one (see :func:`onnxq.exporters.hf.resolve_model_source`).
        opset: ONNX opset of the default domain.
        progress: Print one short line per step to stderr.

    Returns:
        The exported model (task ``image-classification``, input ``pixel_values``,
        output ``logits``).

    Raises:
        ModelLoadError: The model cannot be found or loaded.
        OnnxqError: Not a ViT/DeiT classifier, the export fails, or the graph does not
            reproduce the PyTorch logits.
    """
    folder, config = open_export_source(source, supported=SUPPORTED_VIT_TYPES, task=TASK)
    model_type = str(config["model_type"])
    import torch

    with _quiet():
        _say(progress, f"loading {folder}")
        model = _load(folder, config)
        wrapper = _make_wrapper(model).eval()
        size = int(model.config.image_size)
        channels = int(getattr(model.config, "num_channels", 3))
        sample = _pixels(2, channels, size, seed=0)
        batch = torch.export.Dim("batch")
        _say(progress, f"exporting {model_type} ({TASK}) to ONNX opset {opset}")
        try:
            program = torch.onnx.export(
                wrapper,
                (torch.from_numpy(sample),),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: batch}},
            )
        except Exception as exc:
            raise OnnxqError(f"torch.onnx.export failed for {folder}: {_one_line(exc)}") from exc
        onnx_model = program.model
        _tidy_graph(onnx_model)
        onnx_model.graph.inputs[0].name = INPUT_NAME
        props = onnx_model.metadata_props
        props["onnxq.source"] = _source_name(source, folder)
        props["onnxq.task"] = TASK
        props["onnxq.model_type"] = model_type
        if (folder / "preprocessor_config.json").is_file():
            props["onnxq.image_processor"] = str(folder.resolve())
        _say(progress, "checking the graph in onnxruntime")
        diff = _validate(onnx_model, wrapper, {INPUT_NAME: _pixels(3, channels, size, seed=1)})

    return ExportResult(
        model=onnx_model,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        task=TASK,
        source=folder,
        max_abs_diff=diff,
    )
