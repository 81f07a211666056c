"""Build the ordered pass list of a conversion from its recipe.

Order matters and is fixed here:

1. canonicalize (done by :func:`onnxq.prepare`): fold constants, fuse LayerNorm/GELU,
   Gemm → MatMul, so every later matcher sees one form;
2. FP32-equivalent outlier passes, which need statistics of the *untransformed*
   graph (a short calibration run, like the OS+ paper's single migration batch);
3. the full calibration of the *transformed* graph (scales must describe the
   activations that will actually be quantized);
4. Q/DQ insertion.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from onnxq._progress import Progress
from onnxq.recipe import Recipe

__all__ = ["apply_outlier_passes"]


def apply_outlier_passes(
    model: ir.Model, data: Any, recipe: Recipe, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Apply the recipe's FP32-equivalent outlier passes to ``model`` in place.

    Returns a JSON-serialisable description of what was applied per site.
    """
    methods = [m for m in recipe.outliers if m != "none"]
    if not methods:
        return {"methods": [], "sites": []}
    raise NotImplementedError(f"outlier methods {methods} are not available yet")
