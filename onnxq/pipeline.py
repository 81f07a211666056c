"""Build the ordered pass list of a conversion from its recipe.

Order matters and is fixed here:

1. canonicalize (done by :func:`onnxq.prepare`): fold constants, fuse LayerNorm/GELU,
   Gemm → MatMul, so every later matcher sees one form;
2. FP32-equivalent outlier passes. They need statistics of the *untransformed*
   graph, with a bounded reservoir of activation rows per site: a short
   calibration run over the first batches (the OS+ paper migrates from a single
   batch). Norm-site passes (OS+, SmoothQuant) run first; the explicit FFN-input
   scaling runs after them on the same statistics, which stay valid because the
   norm folds change only the norm outputs and restore the residual branch;
3. the full calibration of the *transformed* graph (scales must describe the
   activations that will actually be quantized);
4. Q/DQ insertion.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import onnx_ir as ir

from onnxq._progress import Progress
from onnxq.calibration.runner import calibrate
from onnxq.errors import OnnxqError
from onnxq.passes._patterns import find_linears, find_norm_sites
from onnxq.recipe import Recipe
from onnxq.targets.profiles import get_target

__all__ = ["apply_outlier_passes", "outlier_pass_list"]

# Batches of the calibration data used to choose shifts and scales.
MIGRATION_BATCHES = 4
MIGRATION_ROWS = 1024


def _expand(methods: tuple[str, ...], target: str = "tensorrt") -> list[str]:
    out: list[str] = []
    for m in methods:
        if m == "none":
            continue
        if m == "auto":
            if target == "ort-cpu":
                # onnxruntime CPU: OS+ only. Its folds cost one Mul per norm site at
                # run time (the post-LN residual restore, ~2%); PEG's groups, even as one
                # Split per FFN input, add 30 smaller GEMMs, 30 QuantizeLinear and 6 Sums
                # (~10% slower: 1.51x vs 1.66x FP32 at batch 32 x 128, 1.35x vs 1.54x at
                # batch 1), and the asymmetric uint8 activations of this target need PEG
                # less: held-out cosine 0.995 with OS+ alone vs 0.997 with OS+ + PEG
                # (docs/benchmarks.md, speed section).
                out += ["osplus"]
            else:
                # The default for per-tensor static W8A8: OS+ at every norm site plus
                # per-embedding-group splits at FFN inputs with channel outliers (on
                # all-MiniLM-L6-v2 PEG there beats explicit FFN shift/scale: held-out
                # cosine 0.996 vs 0.993, see docs/benchmarks.md).
                out += ["osplus", "peg"]
        else:
            out.append(m)
    seen: list[str] = []
    for m in out:
        if m not in seen:
            seen.append(m)
    if "osplus" in seen and "osplus-shift" in seen:
        seen.remove("osplus-shift")
    if "mosf" in seen and ({"osplus", "osplus-shift", "smoothquant"} & set(seen)):
        raise OnnxqError("mosf folds the same LayerNorm sites as osplus/smoothquant; choose one")
    if "smoothquant" in seen and ("osplus" in seen or "osplus-shift" in seen):
        raise OnnxqError("choose one of smoothquant and osplus for the norm sites, not both")
    return seen


def outlier_pass_list(methods: list[str], stats, *, symmetric: bool) -> list[ir.passes.PassBase]:
    """The outlier passes for ``methods`` in their fixed order."""
    from onnxq.passes.ffn_scaling import ExplicitChannelScalingPass
    from onnxq.passes.outlier_suppression_plus import OutlierSuppressionPlusPass
    from onnxq.passes.smooth_quant import SmoothQuantPass

    passes: list[ir.passes.PassBase] = []
    if "osplus" in methods:
        passes.append(OutlierSuppressionPlusPass(stats=stats, symmetric=symmetric))
    if "osplus-shift" in methods:
        passes.append(OutlierSuppressionPlusPass(stats=stats, scale=False, symmetric=symmetric))
    if "smoothquant" in methods:
        passes.append(SmoothQuantPass(stats=stats))
    if "mosf" in methods:
        from onnxq.passes.mosf import MedianScaleReparamPass

        passes.append(MedianScaleReparamPass(stats=stats, symmetric=symmetric))
    if "ffn-scaling" in methods:
        passes.append(ExplicitChannelScalingPass(stats=stats, symmetric=symmetric))
    if "peg" in methods:
        from onnxq.passes.ffn_scaling import DEFAULT_PRODUCERS
        from onnxq.passes.peg import PerEmbeddingGroupPass

        # After a norm-site fold the norm outputs' statistics are stale: PEG then
        # only splits FFN inputs, whose statistics the folds leave intact.
        norm_folds = {"osplus", "osplus-shift", "smoothquant"} & set(methods)
        producers = DEFAULT_PRODUCERS if norm_folds else None
        passes.append(PerEmbeddingGroupPass(stats=stats, producers=producers))
    return passes


def _site_tensors(model: ir.Model) -> list[str]:
    from onnxq.passes.ffn_scaling import DEFAULT_PRODUCERS

    names: list[str] = []
    for site in find_norm_sites(model.graph):
        names.append(site.output.name)
    for unit in find_linears(model.graph):
        prod = unit.input.producer()
        if prod is not None and prod.op_type in DEFAULT_PRODUCERS:
            names.append(unit.input.name)
    return list(dict.fromkeys(n for n in names if n))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


def apply_outlier_passes(
    model: ir.Model, data: Any, recipe: Recipe, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Apply the recipe's FP32-equivalent outlier passes to ``model`` in place.

    Returns a JSON-serialisable description of what was applied per site.
    """
    image = any(v.name == "pixel_values" for v in model.graph.inputs)
    if image and "auto" in recipe.outliers:
        # Vision transformers: DopQ-ViT's MOSF at the LayerNorm sites (tiny ViT W8A8:
        # cosine 0.952 -> 0.999, docs/benchmarks.md) plus PEG at outlier FFN inputs.
        recipe = recipe.replace(outliers=tuple("mosf" if m == "auto" else m
                                               for m in recipe.outliers) + ("peg",))
    methods = _expand(recipe.outliers, recipe.target)
    if not methods:
        return {"methods": [], "sites": []}
    tensors = _site_tensors(model)
    if not tensors:
        return {"methods": methods, "sites": [], "note": "no outlier sites in this graph"}
    target = get_target(recipe.target)
    batches = list(itertools.islice(iter(data), MIGRATION_BATCHES))
    stats = calibrate(model, batches, tensors=tensors, sample_rows=MIGRATION_ROWS)
    sites: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for p in outlier_pass_list(methods, stats, symmetric=target.activation_symmetric):
        result = p(model)
        name = type(p).__name__
        for site in getattr(result, "sites", []):
            sites.append({"pass": name, **site})
        for site in getattr(result, "skipped", []):
            skipped.append({"pass": name, **site})
    return _jsonable({"methods": methods, "sites": sites, "skipped": skipped})
