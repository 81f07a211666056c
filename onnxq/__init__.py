"""onnxq: accurate static INT8 ONNX graphs for transformer and state-space models.

The public API::

    import onnxq
    model = onnxq.export("path/to/hf-folder")      # or onnxq.load("model.onnx")
    onnxq.prepare(model)                            # canonicalize
    stats = onnxq.calibrate(model, "calib.txt", tokenizer="path/to/hf-folder")
    onnxq.quantize(model, stats, recipe=onnxq.Recipe(target="tensorrt"))
    onnxq.save(model, "model.int8.onnx")

or all at once: ``onnxq.convert("path/to/hf-folder", "model.int8.onnx")``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxq._api import (  # noqa: E402
    ConvertResult,
    calibrate,
    convert,
    export,
    load,
    load_source,
    prepare,
    quantize,
    save,
    validate,
)
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "ConvertResult",
    "OnnxqError",
    "Recipe",
    "__version__",
    "calibrate",
    "convert",
    "export",
    "load",
    "load_recipe",
    "load_source",
    "prepare",
    "quantize",
    "save",
    "validate",
]
