"""The conversion report: JSON for machines, Markdown for people."""

from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any

import onnx_ir as ir

from onnxq import __version__
from onnxq.io import atomic_output
from onnxq.recipe import Recipe
from onnxq.targets.profiles import TargetProfile

__all__ = ["build_report", "linear_weight_coverage", "write_reports"]


def linear_weight_coverage(model: ir.Model) -> dict[str, Any]:
    """Share of linear-layer weight elements read through DequantizeLinear by MatMul/Gemm."""
    from onnxq.targets.lint import linear_weight_coverage as _cov

    q, total = _cov(model)
    return {"quantized_elements": q, "total_elements": total,
            "fraction": (q / total) if total else 0.0}


def build_report(
    *,
    model: ir.Model,
    recipe: Recipe,
    target: TargetProfile,
    qdq: Any,
    fidelity: Any,
    outliers: dict[str, Any],
    timings: dict[str, float],
    stats: Any,
    source: str,
) -> dict[str, Any]:
    """Assemble the report dictionary of a conversion."""
    from onnxq.targets.lint import lint

    ops = collections.Counter(n.op_type for n in model.graph)
    violations = lint(model, target)
    return {
        "onnxq_version": __version__,
        "source": source,
        "target": target.name,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in recipe.__dict__.items()},
        "calibration": {k: v for k, v in stats.meta.items()} if stats is not None else {},
        "fidelity": fidelity.as_dict() if fidelity is not None else None,
        "coverage": linear_weight_coverage(model),
        "quantized_activations": [
            {"tensor": a.name, "module": a.module, "kind": a.kind, "scale": a.scale,
             "zero_point": a.zero_point, "range": list(a.range), "method": a.method}
            for a in qdq.activations
        ],
        "kept_fp": list(qdq.kept_fp),
        "int8_embeddings": list(getattr(qdq, "embeddings", [])),
        "outliers": outliers,
        "lint": [str(v) for v in violations],
        "op_counts": dict(sorted(ops.items())),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# onnxq conversion report", "", f"- source: {report['source']}",
             f"- target: {report['target']}"]
    out = report.get("output")
    if out:
        lines.append(f"- output: {out['path']} ({out['bytes'] / 1e6:.1f} MB)")
    fid = report.get("fidelity")
    if fid:
        lines.append(f"- mean cosine vs FP32: {fid['mean_cosine']:.4f} "
                     f"(min {fid['min_cosine']:.4f}, {fid['samples']} held-out samples)")
        if fid.get("recall_at_10") is not None:
            lines.append(f"- neighbour recall@10 vs FP32: {fid['recall_at_10']:.3f}")
        if fid.get("top1_agreement") is not None:
            lines.append(f"- top-1 agreement vs FP32: {fid['top1_agreement']:.3f}")
    cov = report["coverage"]
    lines.append(f"- linear weights through DequantizeLinear: {100 * cov['fraction']:.1f}%")
    lines.append(f"- lint ({report['target']}): "
                 + ("clean" if not report["lint"] else f"{len(report['lint'])} violations"))
    if report["kept_fp"]:
        lines.append(f"- kept in floating point: {', '.join(report['kept_fp'])}")
    fb = report.get("fallback")
    if fb:
        lines += ["", "## Accuracy-driven fallback", "",
                  f"Target mean cosine {fb['target_cosine']}: "
                  + ("reached" if fb["reached"] else "not reached") + ".", "",
                  "| step | kept in floating point | mean cosine |", "|---|---|---|"]
        for i, st in enumerate(fb["steps"]):
            lines.append(f"| {i} | {st['kept_fp'] or '(all quantized)'} | {st['mean_cosine']:.5f} |")
        if fb.get("speed_vs_fully_quantized"):
            lines.append(f"\nSpeed of the fallback graph vs the fully quantized one "
                         f"(onnxruntime CPU, batch 8x128): {fb['speed_vs_fully_quantized']:.2f}x")
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["timings_s"].items()]
    sites = report.get("outliers", {}).get("sites", [])
    if sites:
        lines += ["", "## Outlier methods per site", "", "| site | method | detail |", "|---|---|---|"]
        for s in sites:
            detail = ", ".join(f"{k}={_fmt(s[k])}" for k in ("t", "max_scale", "scaled_channels",
                               "loss_before", "loss_after") if k in s)
            lines.append(f"| {s.get('module') or s.get('site')} | {s.get('method')} | {detail} |")
    lines += ["", "## Quantized activations", "",
              "| module | tensor | kind | range | scale | zero point |", "|---|---|---|---|---|---|"]
    for a in report["quantized_activations"]:
        lo, hi = a["range"]
        lines.append(f"| {a['module']} | {a['tensor']} | {a['kind']} | [{lo:.3g}, {hi:.3g}] | "
                     f"{a['scale']:.3g} | {a['zero_point']} |")
    if report["lint"]:
        lines += ["", "## Lint", ""] + [f"- {v}" for v in report["lint"]]
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], model_path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<model>.report.json`` and ``<model>.report.md`` atomically."""
    base = pathlib.Path(model_path)
    paths = []
    for suffix, text in ((".report.json", json.dumps(report, indent=2, sort_keys=True) + "\n"),
                         (".report.md", _markdown(report))):
        dest = base.with_name(base.name.removesuffix(".onnx") + suffix)
        with atomic_output(dest) as tmp:
            (tmp / dest.name).write_text(text, encoding="utf-8")
        paths.append(dest)
    return paths[0], paths[1]
