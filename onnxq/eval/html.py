"""A self-contained HTML report: summary, outlier verdicts, per-layer error, channel ranges.

:func:`write_html_report` writes one HTML file with inline CSS and every plot
embedded as a base64 PNG data URI (the page needs no network and no other file),
the same PNGs beside it in ``<name>.plots/``, and the data of the page as
``<name>.data.json``.  Plots are drawn with matplotlib's Agg backend (no display).
Everything is written atomically through :func:`onnxq.io.atomic_output`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxq.io import atomic_output

__all__ = ["write_html_report"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;
max-width:1400px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;margin-top:32px;
border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fde8e8}tr.warn td{background:#fff6dd}
.v-none{color:#666}.v-OSp,.v-PEG,.v-SmoothQuant{color:#0b5;font-weight:600}
.v-Hadamard{color:#b60;font-weight:600}.v-keepFP{color:#c00;font-weight:700}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.muted{color:#777;font-size:12px}
"""


# ------------------------------------------------------------------ helpers
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return format(v, fmt)
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "",
           row_classes: Sequence[str] | None = None, numeric: Sequence[int] = ()) -> str:
    out = [f'<table class="{_e(cls)}">', "<thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append(f'<tr class="{_e(rc)}">' if rc else "<tr>")
        for j, cell in enumerate(row):
            c = ' class="num"' if j in numeric else ""
            out.append(f"<td{c}>{cell if isinstance(cell, _Raw) else _e(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw(str):
    """Table cell content that is already HTML."""


def _as_dicts(rows: Any) -> list[dict[str, Any]]:
    return [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in rows]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------- plots
def _plot_layer_errors(series: Mapping[str, list[dict[str, Any]]], role: str) -> bytes | None:
    """One bar panel per model (their rows differ: PEG splits, ORT's extra Q/DQ)."""
    panels = []
    for name, rows in series.items():
        rows = [r for r in rows if r["role"] == role and r.get("sqnr_db") is not None]
        if rows:
            panels.append((name, rows))
    if not panels:
        return None
    fig = _figure(13, 3.6 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharey=True)[:, 0]
    for ax, (name, rows) in zip(axes, panels, strict=True):
        vals = np.array([min(float(r["sqnr_db"]), 80.0) for r in rows])
        worst = np.argsort(vals)[:5]
        colors = ["#d62728" if i in set(worst.tolist()) else "#1f77b4" for i in range(len(vals))]
        ax.bar(np.arange(len(vals)), vals, color=colors)
        labels = [r["module"] or r["tensor"] for r in rows]
        step = max(1, len(labels) // 45)
        ax.set_xticks(np.arange(0, len(labels), step))
        ax.set_xticklabels([_short(lbl) for lbl in labels[::step]], rotation=75, fontsize=7)
        ax.set_ylabel("SQNR vs FP32 (dB)")
        ax.set_title(f"{name + ': ' if name else ''}{role}s in graph order "
                     "(red: 5 worst; lower is worse)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _short(name: str) -> str:
    return (name.replace("encoder.layer.", "L").replace("attention.", "att.")
            .replace(".self", "").replace("output.", "out."))[:40]


def _plot_channels(title: str, before: tuple[np.ndarray, np.ndarray],
                   after: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    fig = _figure(13, 3.6)
    ax = fig.add_subplot()
    lo, hi = before
    ch = np.arange(lo.shape[0])
    ax.fill_between(ch, lo, hi, step="mid", alpha=0.45, color="#d62728",
                    label="before passes (min..max)")
    if after is not None and after[0].shape == lo.shape:
        ax.fill_between(ch, after[0], after[1], step="mid", alpha=0.6, color="#1f77b4",
                        label="after passes (min..max)")
    top = np.argsort(-np.maximum(-lo, hi))[:3]
    for c in top:
        ax.annotate(str(int(c)), (c, hi[c] if hi[c] >= -lo[c] else lo[c]), fontsize=8,
                    ha="center", va="bottom")
    ax.set_xlabel("channel")
    ax.set_ylabel("activation range")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _observer_range(stats: Any, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    if stats is None:
        return None
    try:
        obs = stats[name]
    except (KeyError, TypeError):
        return None
    if getattr(obs, "count", 0) == 0 or obs.channels <= 1:
        return None
    return np.asarray(obs.ch_min, np.float64), np.asarray(obs.ch_max, np.float64)


def _channel_sites(analysis: Any, stats_before: Any, stats_after: Any,
                   limit: int) -> list[tuple[str, str, tuple, tuple | None]]:
    """``(title, name, before, after)`` of the ``limit`` sites with the worst channel ratio."""
    cands: list[tuple[float, str, str]] = []
    site_objs = {}
    if analysis is not None and hasattr(analysis, "sites"):
        for s in analysis.sites:
            if s.kind == "residual" or s.channels <= 1:
                continue
            site_objs[s.tensor] = s
            cands.append((s.channel_ratio, s.tensor, f"{s.module} ({s.kind})"))
    elif stats_before is not None:
        for name in stats_before:
            r = _observer_range(stats_before, name)
            if r is None:
                continue
            a = np.maximum(-r[0], r[1])
            med = float(np.median(a))
            cands.append((float(a.max() / med) if med > 0 else math.inf, name, name))
    cands.sort(key=lambda c: -c[0] if math.isfinite(c[0]) else -1e30)
    out = []
    for ratio, name, label in cands:
        before = _observer_range(stats_before, name)
        if before is None and name in site_objs:
            s = site_objs[name]
            if s.ch_min.size:
                before = (s.ch_min, s.ch_max)
        if before is None:
            continue
        after = _observer_range(stats_after, name)
        # Prefer sites that have an "after" when after-statistics were given.
        out.append((f"{label}: {name} (channel max/median {_num(ratio, '.1f')})", name, before,
                    after))
    if stats_after is not None:
        out.sort(key=lambda t: t[3] is None)
    return out[:limit]


# ------------------------------------------------------------------ sections
def _summary(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    for key in ("source", "target", "fp32", "quantized"):
        if report.get(key):
            rows.append((key, report[key]))
    out = report.get("output") or {}
    if out:
        rows.append(("output", f"{out.get('path')} ({out.get('bytes', 0) / 1e6:.1f} MB)"))
    fid = report.get("fidelity")
    if fid:
        rows.append(("mean cosine vs FP32", f"{fid['mean_cosine']:.4f} (min "
                     f"{fid['min_cosine']:.4f}, {fid['samples']} held-out samples)"))
        if fid.get("recall_at_10") is not None:
            rows.append(("neighbour recall@10", f"{fid['recall_at_10']:.3f}"))
        if fid.get("top1_agreement") is not None:
            rows.append(("top-1 agreement", f"{fid['top1_agreement']:.3f}"))
    cov = report.get("coverage")
    if cov:
        rows.append(("linear weights through DequantizeLinear",
                     f"{100 * cov['fraction']:.1f}%"))
    if "lint" in report:
        lint = report["lint"] or []
        rows.append((f"lint ({report.get('target', '')})",
                     "clean" if not lint else f"{len(lint)} violations"))
    if report.get("kept_fp"):
        rows.append(("kept in floating point", ", ".join(report["kept_fp"])))
    cal = report.get("calibration")
    if isinstance(cal, Mapping) and cal:
        rows.append(("calibration", ", ".join(f"{k}={v}" for k, v in cal.items())))
    elif isinstance(cal, (list, tuple)) and cal:
        rows.append(("calibration sets", "; ".join(map(str, cal))))
    for k, v in (report.get("extra") or {}).items():
        rows.append((k, v))
    parts = ['<h2 id="summary">Summary</h2>',
             _table(["", "value"], rows, cls="summary")]
    timings = report.get("timings_s") or {}
    if timings:
        total = sum(float(v) for v in timings.values())
        trows = [(k, f"{float(v):.2f}") for k, v in timings.items()] + [("total", f"{total:.2f}")]
        parts += ['<h2 id="timings">Stage timings</h2>',
                  _table(["stage", "seconds"], trows, cls="timings", numeric=(1,))]
    return "".join(parts)


def _outlier_section(analysis: Any, report: Mapping[str, Any]) -> str:
    parts = []
    if analysis is not None:
        d = analysis.as_dict() if hasattr(analysis, "as_dict") else analysis
        parts.append('<h2 id="outliers">Outlier analysis and recommended method per site</h2>')
        if d.get("datasets"):
            parts.append(f'<p class="muted">calibration sets: {_e("; ".join(d["datasets"]))}; '
                         f'scales by {_e(d.get("method", ""))}; verdict counts: '
                         f'{_e(", ".join(f"{k} {v}" for k, v in sorted(d.get("verdicts", {}).items())))}</p>')
        rows, classes = [], []
        for s in d["sites"]:
            top = ", ".join(f"{c}: {_num(v, '.3g')}" for c, v in s["top_channels"])
            sens = "-" if s.get("sensitivity") is None else f"{100 * s['sensitivity']:.0f}%"
            v = s["verdict"]
            cls = "v-" + v.replace("+", "p").replace(" ", "")
            rows.append((s["module"], s["kind"], _num(s["absmax"]), _num(s["median_abs"]),
                         _num(s["max_median_ratio"], ".1f"), _num(s["channel_ratio"], ".1f"),
                         _num(s["kurtosis"], ".1f"),
                         f"{_num(s['asymmetry'], '.2f')} (ch {s['asymmetry_channel']})",
                         top, sens, _Raw(f'<span class="{cls}">{_e(v)}</span>'), s["reason"]))
            classes.append("warn" if v not in ("none",) else "")
        parts.append(_table(["site", "kind", "max |x|", "median |x|", "max/median",
                             "channel max/median", "kurtosis", "worst asymmetry",
                             "top channels (|max|)", "scale sensitivity", "method", "why"],
                            rows, cls="outliers", row_classes=classes,
                            numeric=(2, 3, 4, 5, 6, 9)))
    sites = (report.get("outliers") or {}).get("sites") or []
    if sites:
        parts.append('<h2 id="applied">Outlier passes applied</h2>')
        rows = []
        for s in sites:
            detail = ", ".join(f"{k}={_num(s[k])}" for k in (
                "t", "alpha", "max_scale", "scaled_channels", "groups", "loss_before",
                "loss_after") if k in s)
            rows.append((s.get("module") or s.get("site", ""), s.get("pass", ""),
                         s.get("method", ""), detail))
        parts.append(_table(["site", "pass", "method", "detail"], rows, cls="applied"))
    return "".join(parts)


def _errors_section(series: Mapping[str, list[dict[str, Any]]], top: int = 15) -> str:
    parts = ['<h2 id="layer-errors">Per-layer error vs FP32</h2>',
             '<p class="muted">SQNR = 10·log10(Σx² / Σ(x−x̂)²) against the FP32 graph; '
             "activations are compared after their DequantizeLinear (upstream error plus "
             "their own rounding); local SQNR is the Q/DQ pair alone.</p>"]
    for name, rows in series.items():
        final = [r for r in rows if r["role"] == "model-output" and r.get("sqnr_db") is not None]
        ranked = sorted((r for r in rows if r["role"] != "model-output"
                         and r.get("sqnr_db") is not None),
                        key=lambda r: (r["sqnr_db"], r["index"]))[:top]
        head = f"<h3>{_e(name)}: worst {len(ranked)} tensors</h3>" if name else ""
        if final:
            head += "".join(f'<p>model output {_e(r["tensor"])}: SQNR '
                            f'{_num(r["sqnr_db"], ".2f")} dB, relative error '
                            f'{_num(r["rel_error"], ".4f")}</p>' for r in final)
        parts.append(head)
        parts.append(_table(
            ["rank", "SQNR dB", "rel. error", "local SQNR dB", "role", "module", "tensor"],
            [(k, _num(r["sqnr_db"], ".2f"), _num(r["rel_error"], ".4f"),
              _num(r.get("local_sqnr_db"), ".1f"), r["role"], r["module"], r["tensor"])
             for k, r in enumerate(ranked, 1)],
            cls="ranking", numeric=(0, 1, 2, 3)))
    for name, rows in series.items():
        parts.append(f"<details><summary>all {len(rows)} tensors of {_e(name or 'the model')} "
                     "in graph order</summary>")
        parts.append(_table(
            ["#", "role", "module", "tensor", "SQNR dB", "rel. error", "local SQNR dB", "note"],
            [(r["index"], r["role"], r["module"], r["tensor"], _num(r.get("sqnr_db"), ".2f"),
              _num(r.get("rel_error"), ".4f"), _num(r.get("local_sqnr_db"), ".1f"),
              r.get("note", "")) for r in rows],
            cls="layer-errors", numeric=(0, 4, 5, 6)))
        parts.append("</details>")
    return "".join(parts)


# ---------------------------------------------------------------------- main
def write_html_report(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    analysis: Any = None,
    layer_errors: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None,
    stats_before: Any = None,
    stats_after: Any = None,
    title: str | None = None,
    channel_plots: int = 4,
) -> pathlib.Path:
    """Write a self-contained HTML report (plus ``<name>.plots/*.png`` and ``<name>.data.json``).

    Args:
        report: a conversion report (:func:`onnxq.eval.report.build_report`) or any dict
            with some of its keys (``source``, ``fidelity``, ``coverage``, ``lint``,
            ``timings_s``, ``output``, ``outliers``, ``calibration``, ``extra``).
        path: the ``.html`` file to write.
        analysis: an :class:`~onnxq.eval.analyze.AnalysisResult` (or its ``as_dict()``).
        layer_errors: :class:`~onnxq.eval.compare.LayerError` rows (or dicts) of one
            quantized model, or a mapping ``label -> rows`` for several.
        stats_before: :class:`~onnxq.calibration.stats.Stats` of the graph before the
            outlier passes (per-channel ranges).
        stats_after: statistics of the graph after the passes (same tensor names).
        title: page title.
        channel_plots: number of per-channel range plots (the sites with the worst
            channel max/median ratio).

    Returns:
        The path of the HTML file.
    """
    dest = pathlib.Path(path)
    stem = dest.name[: -len(dest.suffix)] if dest.suffix else dest.name
    plots_name = f"{stem}.plots"
    title = title or report.get("title") or "onnxq report"

    series: dict[str, list[dict[str, Any]]] = {}
    if isinstance(layer_errors, Mapping):
        series = {str(k): _as_dicts(v) for k, v in layer_errors.items()}
    elif layer_errors is not None:
        series = {"": _as_dicts(layer_errors)}

    pngs: list[tuple[str, str, bytes]] = []  # (file name, caption, bytes)
    if series:
        for role in ("activation", "output"):
            png = _plot_layer_errors(series, role)
            if png is not None:
                pngs.append((f"layer_error_{role}s.png", f"SQNR per {role} in graph order", png))
    for k, (cap, _name, before, after) in enumerate(
            _channel_sites(analysis, stats_before, stats_after, channel_plots)):
        pngs.append((f"channel_ranges_{k + 1}.png", cap, _plot_channels(cap, before, after)))

    body = [f"<h1>{_e(title)}</h1>"]
    from onnxq import __version__

    body.append(f'<p class="muted">onnxq {_e(__version__)}</p>')
    body.append(_summary(report))
    figs = [p for p in pngs if p[0].startswith("layer_error")]
    chans = [p for p in pngs if p[0].startswith("channel_ranges")]
    if figs:
        body.append('<h2 id="error-plots">Per-layer error plots</h2>')
    for fname, cap, data in figs:
        body.append(_img(fname, cap, data))
    if chans:
        body.append('<h2 id="channel-ranges">Per-channel ranges'
                    + (" before/after the outlier passes" if stats_after is not None else "")
                    + "</h2>")
    for fname, cap, data in chans:
        body.append(_img(fname, cap, data))
    body.append(_outlier_section(analysis, report))
    if series:
        body.append(_errors_section(series))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")

    payload = {"report": dict(report), "title": title,
               "analysis": (analysis.as_dict() if hasattr(analysis, "as_dict") else analysis),
               "layer_errors": series or None, "plots": [f"{plots_name}/{p[0]}" for p in pngs]}
    with atomic_output(dest) as tmp:
        pdir = tmp / plots_name
        pdir.mkdir()
        for fname, _cap, data in pngs:
            (pdir / fname).write_bytes(data)
        (tmp / f"{stem}.data.json").write_text(
            json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n",
            encoding="utf-8")
        (tmp / dest.name).write_text(page, encoding="utf-8")
        old = dest.parent / plots_name
        if old.is_dir():
            shutil.rmtree(old)
    return dest


def _img(fname: str, caption: str, data: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{_e(caption)}" data-file="{_e(fname)}">'
            f"<figcaption class=\"muted\">{_e(caption)}</figcaption></figure>")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "as_dict"):
        return o.as_dict()
    return str(o)
