"""Outlier and calibration-set analysis: what each quantization site looks like, and what to do.

:func:`analyze` calibrates the (canonical, FP32) model once per calibration data set
and describes every *site*, in graph order:

* ``norm-output``: the output of a LayerNorm/RMSNorm that feeds linear layers (in a
  post-LN BERT this is also the residual stream);
* ``residual``: an ``Add`` output that feeds a norm (the residual stream before the
  norm; not quantized by onnxq, reported because that is where channel outliers
  are born);
* ``ffn-input``: the input of a linear layer produced by an activation function
  (Gelu, Relu, Mul of SiLU/SwiGLU, ...): the FFN down-projection input;
* ``linear-input``: the input of any other linear layer (attention output
  projection, ...).

Statistics per site (over the first data set; the union is not used so that every
number describes one real calibration run):

* ``absmax``, ``median_abs`` (median of ``|x|`` from the histogram,
  :meth:`~onnxq.calibration.observers.TensorObserver.quantile_abs`) and their
  ratio ``max_median_ratio``: how many median values the grid must span;
* ``channel_ratio``: ``max_j absmax_j / median_j absmax_j`` of the per-channel
  absolute maxima, and ``outlier_channels``: the channels with
  ``absmax_j >= CHANNEL_OUTLIER_FACTOR * median_j absmax_j`` (4x);
* ``kurtosis`` (Pearson, normal = 3) of all values;
* ``top_channels``: the five channels with the largest ``absmax_j``;
* ``asymmetry``: per channel ``|hi_j + lo_j| / (hi_j - lo_j)`` with the channel's
  range widened to include zero (``lo_j = min(min_j, 0)``, ``hi_j = max(max_j, 0)``,
  as a quantization grid must): 0 = symmetric around zero, 1 = one-signed; the worst
  over channels whose range is at least a tenth of the widest channel range;
* ``scales``: the per-tensor scale ``max(|lo|, hi) / 127`` of the chosen range
  estimator (percentile by default) on every data set, and ``sensitivity``:
  ``max(scales) / min(scales) - 1``, how much the scale moves between data sets.

Verdict rules (first match wins; thresholds are module constants)
    1. ``keep FP``: extreme *and* sensitive: ``max_median_ratio >= EXTREME_RATIO``
       and ``sensitivity >= SENSITIVE`` (needs two or more data sets). No static
       per-tensor scale fits both data sets.
    2. ``none``: benign: ``channel_ratio < CHANNEL_OUTLIER_RATIO`` and
       ``max_median_ratio < LOW_RATIO`` and ``kurtosis < HIGH_KURTOSIS``.
    3. ``residual`` sites are not quantized: ``none`` (the norm output's verdict
       covers them), with the statistics kept for reading.
    4. ``Hadamard``: heavy tails spread over many channels:
       ``kurtosis >= HIGH_KURTOSIS`` and ``outlier_channels`` more than
       ``SPREAD_FRACTION`` of all channels, or heavy tails without channel
       structure (``channel_ratio < CHANNEL_OUTLIER_RATIO``, token outliers),
       which per-channel methods cannot fix but a rotation spreads.
    5. With channel outliers (``channel_ratio >= CHANNEL_OUTLIER_RATIO``):
       ``norm-output`` -> ``OS+`` (shift and scale fold into the norm's γ/β and the
       next linears); ``ffn-input`` -> ``PEG`` (no norm to fold into: split the
       outlier channels into their own per-tensor group); ``linear-input`` ->
       ``SmoothQuant`` (migrate the channel scale into the weights).
    6. Otherwise (large ratio but moderate channel spread): ``SmoothQuant`` for
       norm outputs and linear inputs, ``PEG`` for FFN inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq._progress import Progress
from onnxq.calibration.observers import TensorObserver, compute_range
from onnxq.calibration.runner import calibrate
from onnxq.calibration.stats import Stats
from onnxq.errors import OnnxqError
from onnxq.passes._patterns import find_linears, find_norm_sites, module_of

__all__ = [
    "AnalysisResult",
    "METHODS",
    "SiteAnalysis",
    "analysis_tensors",
    "analyze",
    "format_analysis",
    "site_verdict",
]

#: The methods a verdict can name.
METHODS = ("none", "SmoothQuant", "OS+", "PEG", "Hadamard", "keep FP")

#: Ops whose output makes a linear input an FFN input (down-projection).
FFN_PRODUCERS = ("Gelu", "Relu", "Mul", "Sigmoid", "Tanh", "Erf", "FastGelu", "BiasGelu")

#: A channel is an outlier channel when its |max| is this many times the median channel's
#: (the same 4 as PEG's and FFN scaling's ``min_outlier_ratio``).
CHANNEL_OUTLIER_FACTOR = 4.0
#: ``channel_ratio`` from which a site has channel outliers.
CHANNEL_OUTLIER_RATIO = 4.0
#: max/median of |x| below which a tensor is benign (a Gaussian with 10^6 values gives
#: about 7, real transformer activations without outliers 20 to 40).
LOW_RATIO = 50.0
HIGH_KURTOSIS = 30.0
SPREAD_FRACTION = 0.10
EXTREME_RATIO = 2000.0
SENSITIVE = 0.5
TOP_CHANNELS = 5


@dataclasses.dataclass
class SiteAnalysis:
    """Statistics and verdict of one site (see the module docstring)."""

    tensor: str
    module: str
    kind: str
    channels: int
    absmax: float
    median_abs: float
    max_median_ratio: float
    channel_ratio: float
    outlier_channels: list[int]
    kurtosis: float
    top_channels: list[tuple[int, float]]
    asymmetry: float
    asymmetry_channel: int
    scales: list[float]
    sensitivity: float | None
    verdict: str
    reason: str
    ch_min: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.zeros(0))
    ch_max: np.ndarray = dataclasses.field(repr=False, default_factory=lambda: np.zeros(0))

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("ch_min", "ch_max")}
        d["top_channels"] = [[int(c), float(v)] for c, v in self.top_channels]
        d["outlier_channels"] = [int(c) for c in self.outlier_channels]
        return _jsonable(d)


@dataclasses.dataclass
class AnalysisResult:
    """What :func:`analyze` found: one :class:`SiteAnalysis` per site, in graph order."""

    sites: list[SiteAnalysis]
    datasets: list[str]
    method: str
    stats: list[Stats] = dataclasses.field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.verdict] = counts.get(s.verdict, 0) + 1
        return {"datasets": list(self.datasets), "method": self.method,
                "verdicts": counts, "sites": [s.as_dict() for s in self.sites]}

    def site(self, tensor: str) -> SiteAnalysis:
        for s in self.sites:
            if s.tensor == tensor:
                return s
        raise KeyError(tensor)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analysis_tensors(model: ir.Model) -> list[tuple[str, str, str]]:
    """``(tensor, module, kind)`` of every site of ``model``, in graph order."""
    graph = model.graph
    found: dict[str, tuple[str, str]] = {}
    norm_out = {id(s.norm): s for s in find_norm_sites(graph)}
    linears_by_input: dict[int, list] = {}
    for unit in find_linears(graph):
        linears_by_input.setdefault(id(unit.input), []).append(unit)
    norm_ops = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
    for node in graph:
        # residual Add feeding a norm
        if node.op_type in norm_ops:
            inp = node.inputs[0] if node.inputs else None
            prod = inp.producer() if inp is not None else None
            if inp is not None and inp.name and prod is not None and prod.op_type == "Add" \
                    and inp.name not in found and inp.const_value is None:
                found[inp.name] = (f"{module_of(node)} (input)", "residual")
            if id(node) in norm_out:
                out = node.outputs[0]
                if out.name and out.name not in found:
                    found[out.name] = (module_of(node), "norm-output")
        for out in node.outputs:
            units = linears_by_input.get(id(out))
            if not units or not out.name or out.name in found:
                continue
            kind = "ffn-input" if node.op_type in FFN_PRODUCERS else "linear-input"
            found[out.name] = (units[0].module, kind)
    # linear inputs that are graph inputs
    for v in graph.inputs:
        units = linears_by_input.get(id(v))
        if units and v.name and v.name not in found:
            found[v.name] = (units[0].module, "linear-input")
    order = {}
    for i, node in enumerate(graph):
        for o in node.outputs:
            order[o.name] = i
    items = sorted(found.items(), key=lambda kv: order.get(kv[0], -1))
    return [(name, mod, kind) for name, (mod, kind) in items]


def _scale(obs: TensorObserver, method: str) -> float:
    lo, hi = compute_range(obs, method)
    return max(-lo, hi) / 127.0


def site_verdict(kind: str, *, max_median_ratio: float, channel_ratio: float, kurtosis: float,
                 outlier_fraction: float, sensitivity: float | None) -> tuple[str, str]:
    """The recommended method for one site and why (rules in the module docstring)."""
    if (sensitivity is not None and sensitivity >= SENSITIVE
            and max_median_ratio >= EXTREME_RATIO):
        return "keep FP", (f"max/median {max_median_ratio:.0f} and the scale moves "
                           f"{100 * sensitivity:.0f}% between calibration sets")
    channel_outliers = channel_ratio >= CHANNEL_OUTLIER_RATIO
    if not channel_outliers and max_median_ratio < LOW_RATIO and kurtosis < HIGH_KURTOSIS:
        return "none", (f"no outliers: channel max/median {channel_ratio:.1f}, "
                        f"max/median {max_median_ratio:.1f}, kurtosis {kurtosis:.1f}")
    if kind == "residual":
        return "none", "LayerNorm input, not quantized; see the norm output below it"
    if kurtosis >= HIGH_KURTOSIS and outlier_fraction > SPREAD_FRACTION:
        return "Hadamard", (f"kurtosis {kurtosis:.0f} with outliers in "
                            f"{100 * outlier_fraction:.0f}% of channels: rotate to spread them")
    if not channel_outliers and (kurtosis >= HIGH_KURTOSIS or max_median_ratio >= LOW_RATIO):
        return "Hadamard", (f"heavy tails without channel structure (channel max/median "
                            f"{channel_ratio:.1f}, kurtosis {kurtosis:.0f})")
    why = f"channel max/median {channel_ratio:.1f}"
    if kind == "norm-output":
        return "OS+", f"{why}: shift+scale fold into the norm's gamma/beta"
    if kind == "ffn-input":
        return "PEG", f"{why} after the activation function, no norm to fold into"
    return "SmoothQuant", f"{why}: migrate channel scales into the weights"


def _describe(name: str, module: str, kind: str, observers: Sequence[TensorObserver],
              method: str) -> SiteAnalysis:
    obs = observers[0]
    absmax = float(obs.absmax)
    median = float(obs.quantile_abs(0.5))
    ratio = absmax / median if median > 0 else math.inf
    ch_abs = np.asarray(obs.ch_absmax, dtype=np.float64)
    ch_min = np.asarray(obs.ch_min, dtype=np.float64)
    ch_max = np.asarray(obs.ch_max, dtype=np.float64)
    med_ch = float(np.median(ch_abs)) if ch_abs.size else 0.0
    if ch_abs.size > 1:
        ch_ratio = float(ch_abs.max() / med_ch) if med_ch > 0 else math.inf
        outliers = [int(c) for c in np.flatnonzero(ch_abs >= CHANNEL_OUTLIER_FACTOR * med_ch)]
        if med_ch == 0:
            outliers = [int(c) for c in np.flatnonzero(ch_abs > 0)]
    else:
        ch_ratio, outliers = 1.0, []
    order = np.argsort(-ch_abs, kind="stable")[:TOP_CHANNELS]
    top = [(int(c), float(ch_abs[c])) for c in order]
    lo_z, hi_z = np.minimum(ch_min, 0.0), np.maximum(ch_max, 0.0)  # ranges include zero
    width = hi_z - lo_z
    asym, asym_ch = 0.0, -1
    if width.size and width.max() > 0:
        wide = np.flatnonzero(width >= 0.1 * width.max())
        a = np.abs(hi_z[wide] + lo_z[wide]) / width[wide]
        k = int(np.argmax(a))
        asym, asym_ch = float(a[k]), int(wide[k])
    try:
        kurt = float(obs.kurtosis())
    except (ValueError, ZeroDivisionError, FloatingPointError):
        kurt = math.nan
    scales = [_scale(o, method) for o in observers]
    sens = None
    if len(scales) > 1 and min(scales) > 0:
        sens = max(scales) / min(scales) - 1.0
    verdict, reason = site_verdict(
        kind, max_median_ratio=ratio, channel_ratio=ch_ratio,
        kurtosis=kurt if math.isfinite(kurt) else 0.0,
        outlier_fraction=len(outliers) / max(ch_abs.size, 1), sensitivity=sens)
    return SiteAnalysis(
        tensor=name, module=module, kind=kind, channels=int(ch_abs.size), absmax=absmax,
        median_abs=median, max_median_ratio=ratio, channel_ratio=ch_ratio,
        outlier_channels=outliers, kurtosis=kurt, top_channels=top, asymmetry=asym,
        asymmetry_channel=asym_ch, scales=scales, sensitivity=sens, verdict=verdict,
        reason=reason, ch_min=ch_min, ch_max=ch_max)


def analyze(
    model: ir.Model,
    datasets: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    method: str = "percentile",
    progress: Progress | None = None,
) -> AnalysisResult:
    """Outlier statistics, calibration-set sensitivity and a method verdict per site.

    Args:
        model: canonical FP32 model (see :func:`onnxq.prepare`); not modified.
        datasets: one or more calibration data sources (iterables of feed dicts,
            e.g. :class:`~onnxq.calibration.data.CalibrationData`).
        names: display names of the data sets (default: their ``description``).
        method: range estimator whose scales are compared between data sets.
        progress: stage timings (``calibrate set N``) and progress bars.

    Returns:
        An :class:`AnalysisResult`; sites in graph order.
    """
    if not datasets:
        raise OnnxqError("analyze needs at least one calibration data set")
    sites = analysis_tensors(model)
    if not sites:
        raise OnnxqError("the model has no linear layers or norms to analyze")
    tensors = [t for t, _, _ in sites]
    all_stats: list[Stats] = []
    progress = progress or Progress(0)
    for i, data in enumerate(datasets):
        label = f"calibrate set {i + 1}" if len(datasets) > 1 else "calibrate"
        with progress.stage(label), \
                progress.bar(label, getattr(data, "num_samples", None)) as update:
            all_stats.append(calibrate(model, data, tensors=tensors, progress=update))
    labels = list(names) if names else [
        getattr(d, "description", "") or f"dataset {i + 1}" for i, d in enumerate(datasets)]
    result = [
        _describe(t, m, k, [s[t] for s in all_stats], method)
        for t, m, k in sites
        if all(s[t].count for s in all_stats)
    ]
    return AnalysisResult(sites=result, datasets=labels, method=method, stats=all_stats)


def format_analysis(result: AnalysisResult, *, only_interesting: bool = False) -> str:
    """A plain-text table of the sites (``only_interesting``: skip benign ones)."""
    lines = [f"calibration sets: {'; '.join(result.datasets)} (scales: {result.method})"]
    head = (f"{'module':<48} {'kind':<12} {'max/med':>8} {'ch.ratio':>8} {'kurt':>7} "
            f"{'asym':>5} {'sens':>6}  {'top channels (|max|)':<34} verdict")
    lines += [head, "-" * len(head)]
    for s in result.sites:
        if only_interesting and s.verdict == "none" and not (
                s.kind == "residual" and s.channel_ratio >= CHANNEL_OUTLIER_RATIO):
            continue
        top = ", ".join(f"{c}:{v:.3g}" for c, v in s.top_channels[:3])
        sens = f"{100 * s.sensitivity:.0f}%" if s.sensitivity is not None else "-"
        lines.append(f"{s.module[:48]:<48} {s.kind:<12} {s.max_median_ratio:8.1f} "
                     f"{s.channel_ratio:8.1f} {s.kurtosis:7.1f} {s.asymmetry:5.2f} {sens:>6}  "
                     f"{top:<34} {s.verdict}")
    counts = result.as_dict()["verdicts"]
    lines.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def stats_ranges(stats: Stats | Mapping[str, TensorObserver], name: str
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(min, max)`` of ``name`` in ``stats`` (None if absent or empty)."""
    try:
        obs = stats[name]
    except (KeyError, TypeError):
        return None
    if obs.count == 0:
        return None
    return np.asarray(obs.ch_min), np.asarray(obs.ch_max)
