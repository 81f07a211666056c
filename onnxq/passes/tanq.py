"""TanQ: a tan-warped non-uniform quantizer for post-Softmax attention probabilities (simulation).

DopQ-ViT (Yang et al., arXiv 2408.03291) quantizes the post-Softmax tensor with a
tangent-based non-uniform quantizer that keeps **more levels near 1** (the few large
attention weights, whose clipping collapses accuracy) than log2-style quantizers do.
The paper's exact formula was not available; this module implements a documented
tan-based codebook quantizer in that spirit and fits its parameters by MSE
(``shared/design/methods.md`` §5).  It is **not** the paper's definition.

The warp
--------
With ``p ∈ [0, p_max]`` (``p_max`` = 1, or the calibrated maximum), ``x = p / p_max``, a
centre ``c ∈ [0, 1/2]`` and a steepness ``α > 0`` with ``α(1 − c) < π/2``::

    g(x) = tan(α (x − c)),   g0 = g(0) = −tan(α c),   g1 = g(1) = tan(α (1 − c))
    u    = (g(x) − g0) / (g1 − g0)                    ∈ [0, 1]
    k    = Round(Clip(u, 0, 1) · L)                   L = 2^bits − 1
    p̂    = p_max · (c + atan(k / L · (g1 − g0) + g0) / α)

``g`` is steep where ``|x − c|`` is large, so the levels ``f⁻¹(k / L)`` are dense at the
ends of the range and sparse around ``c``.  With ``c ≤ 1/2`` the end at 1 is always at
least as dense as the end at 0 (the paper's "more levels near 1"); ``c = 0`` puts the
density at 1 only; ``α → 0`` is the uniform quantizer, which is therefore in the search
space.  ``(α, c)`` are fitted per tensor by minimising the histogram-weighted squared
error on the calibration histogram of that softmax output (a grid over ``c`` and over
``β = α (1 − c)`` as a fraction of π/2).

The graph
---------
For every ``Softmax`` whose output feeds the P·V ``MatMul`` (input 0), the chain
``Mul(1/p_max) → Clip(0, 1) → Mul(α) → Sub(α c) → Tan → Sub(g0) → Mul(L / (g1 − g0)) → Clip(0, L) → Round
→ Mul((g1 − g0) / L) → Add(g0) → Atan → Mul(p_max / α) → Add(c · p_max)`` (standard
ai.onnx ops, opset ≥ 11) is inserted and the P·V MatMul reads ``p̂``.  Every inserted node
carries ``metadata_props["onnxq.simulation"] = "tanq"``: this is an accuracy
*simulation*, not an INT8 kernel path — neither TensorRT nor onnxruntime can execute
TanQ codes as integers.  ``onnxq lint --target tensorrt`` reports such nodes with rule
``simulation-only``.  The deployable default keeps a uniform 8-bit (or FP16)
post-Softmax.  Because the P·V MatMul no longer reads a Softmax through pass-through
ops, :class:`~onnxq.passes.insert_qdq.InsertQDQPass` leaves that MatMul alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._ir_utils import PASS_KEY, unique_name
from onnxq.passes._patterns import find_attention_matmuls, module_of

__all__ = [
    "SIMULATION_KEY",
    "TanQParams",
    "TanQuantSimPass",
    "fit_tanq",
    "tanq_quantize",
    "uniform_quantize",
]

logger = logging.getLogger(__name__)

PASS_TAG = "TanQuantSimPass"
#: Metadata key (value ``"tanq"``) on every node that only simulates a quantizer.
SIMULATION_KEY = "onnxq.simulation"

_HALF_PI = math.pi / 2


@dataclasses.dataclass(frozen=True)
class TanQParams:
    """Parameters of the tan-warped quantizer (see the module docstring)."""

    alpha: float
    center: float
    p_max: float = 1.0
    bits: int = 4

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def ends(self) -> tuple[float, float]:
        g0 = -math.tan(self.alpha * self.center)
        g1 = math.tan(self.alpha * (1.0 - self.center))
        return g0, g1

    def codebook(self) -> np.ndarray:
        """The ``2^bits`` reconstruction levels in ``[0, p_max]``."""
        k = np.arange(self.levels + 1, dtype=np.float64) / self.levels
        if self.alpha <= 1e-9:
            return k * self.p_max
        g0, g1 = self.ends()
        return self.p_max * (self.center + np.arctan(k * (g1 - g0) + g0) / self.alpha)


def tanq_quantize(p: np.ndarray, params: TanQParams) -> np.ndarray:
    """Fake-quantize ``p`` with the tan-warped quantizer (numpy reference of the graph)."""
    x = np.asarray(p, np.float64) / params.p_max
    a, c, n = params.alpha, params.center, params.levels
    if a <= 1e-9:  # the uniform limit
        return np.clip(np.rint(np.clip(x, 0, 1) * n), 0, n) / n * params.p_max
    g0, g1 = params.ends()
    u = (np.tan(a * (np.clip(x, 0, 1) - c)) - g0) / (g1 - g0)
    k = np.rint(np.clip(u, 0.0, 1.0) * n)
    return params.p_max * (c + np.arctan(k / n * (g1 - g0) + g0) / a)


def uniform_quantize(p: np.ndarray, *, bits: int, p_max: float = 1.0) -> np.ndarray:
    """Uniform unsigned ``bits`` fake quantization of ``p`` on ``[0, p_max]``."""
    n = 2**bits - 1
    return np.clip(np.rint(np.asarray(p, np.float64) / p_max * n), 0, n) / n * p_max


def fit_tanq(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    bits: int = 4,
    p_max: float = 1.0,
    centers: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    steps: int = 40,
) -> tuple[TanQParams, float, float]:
    """Fit ``(α, c)`` by weighted MSE on ``values`` (e.g. histogram bin centres + counts).

    Returns:
        ``(params, mse, uniform_mse)``; ``α = 0`` (uniform) is a candidate, so
        ``mse <= uniform_mse`` on the fitting data.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    total = float(w.sum()) or 1.0

    def mse(params: TanQParams) -> float:
        return float(np.sum(w * (tanq_quantize(v, params) - v) ** 2) / total)

    best = TanQParams(0.0, 0.0, p_max, bits)
    uniform = best_mse = mse(best)
    for c in centers:
        for t in np.linspace(0.02, 0.98, steps):
            alpha = t * _HALF_PI / (1.0 - c)
            cand = TanQParams(float(alpha), float(c), p_max, bits)
            value = mse(cand)
            if value < best_mse:
                best, best_mse = cand, value
    return best, best_mse, uniform


@dataclasses.dataclass
class TanQResult(ir.passes.PassResult):
    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class TanQuantSimPass(ir.passes.InPlacePass):
    """Insert a TanQ fake-quant simulation between each Softmax and its P·V MatMul.

    Args:
        bits: code bits (4 or 8; any 2..8 works).
        stats: calibration statistics holding the Softmax outputs (the P·V MatMuls'
            first inputs, as :func:`onnxq.calibration.runner.default_tensors` lists
            them); used to fit ``(α, c)`` and ``p_max`` per tensor.  Without
            statistics for a tensor, ``params`` is used.
        params: fixed parameters (default ``α`` = 0.8·π/2 / (1 − c), ``c`` = 0.5, p_max 1).
        use_observed_max: scale the range to the calibrated maximum instead of 1.
    """

    def __init__(
        self,
        *,
        bits: int = 4,
        stats: Stats | None = None,
        params: TanQParams | None = None,
        use_observed_max: bool = False,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"TanQ bits must be in 2..8, not {bits}")
        self.bits = bits
        self.stats = stats
        self.params = params
        self.use_observed_max = use_observed_max

    def _params_for(self, name: str) -> tuple[TanQParams, dict[str, Any]]:
        if self.stats is not None and name in self.stats:
            obs = self.stats[name]
            hist = obs.hist.astype(np.float64)
            edges = obs.hist_edges()
            centres = (edges[:-1] + edges[1:]) / 2
            keep = (hist > 0) & (centres >= 0)
            p_max = 1.0
            if self.use_observed_max:
                p_max = float(min(max(obs.max, 1e-6), 1.0))
            params, mse, uni = fit_tanq(np.clip(centres[keep], 0, None), hist[keep],
                                        bits=self.bits, p_max=p_max)
            return params, {"fitted": True, "mse": mse, "uniform_mse": uni}
        if self.params is not None:
            return dataclasses.replace(self.params, bits=self.bits), {"fitted": False}
        c = 0.5
        return TanQParams(0.8 * _HALF_PI / (1 - c), c, 1.0, self.bits), {"fitted": False}

    def call(self, model: ir.Model) -> TanQResult:
        graph = model.graph
        result = TanQResult(model, False)
        for att in find_attention_matmuls(graph):
            if att.kind != "pv":
                continue
            p = att.node.inputs[0]
            producer = p.producer() if p is not None else None
            info: dict[str, Any] = {"module": att.module, "tensor": p.name if p else ""}
            if producer is None or producer.op_type != "Softmax":
                info["reason"] = "P·V input is not a Softmax output"
                result.skipped.append(info)
                continue
            if producer.metadata_props.get(SIMULATION_KEY) or any(
                use.node.metadata_props.get(SIMULATION_KEY) for use in p.uses()
            ):
                info["reason"] = "already simulated"
                result.skipped.append(info)
                continue
            params, fit = self._params_for(p.name or "")
            info.update(alpha=params.alpha, center=params.center, p_max=params.p_max,
                        bits=params.bits, **fit)
            new = self._insert(graph, p, att.node, params)
            att.node.replace_input_with(0, new)
            result.sites.append(info)
            result.modified = True
        if result.modified:
            graph.sort()
        return result

    def _insert(self, graph: ir.Graph, p: ir.Value, consumer: ir.Node,
                params: TanQParams) -> ir.Value:
        base = f"{p.name or 'softmax'}_tanq"
        meta = {PASS_KEY: PASS_TAG, SIMULATION_KEY: "tanq", "onnxq.module": module_of(consumer)}
        nodes: list[ir.Node] = []

        def const(tag: str, value: float) -> ir.Value:
            name = unique_name(graph, f"{base}_{tag}")
            arr = np.array(value, dtype=np.float32)
            v = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(arr, name=name))
            graph.register_initializer(v)
            return v

        def op(op_type: str, inputs: list[ir.Value], tag: str) -> ir.Value:
            out = ir.Value(name=unique_name(graph, f"{base}_{tag}"), shape=p.shape, type=p.type)
            nodes.append(ir.node(op_type, inputs, outputs=[out],
                                 name=unique_name(graph, f"{base}_{tag}_{op_type}"),
                                 metadata_props=dict(meta)))
            return out

        n = float(params.levels)
        if params.alpha <= 1e-9:
            x = op("Mul", [p, const("in_scale", n / params.p_max)], "u")
            x = op("Clip", [x, const("lo", 0.0), const("hi", n)], "clip")
            x = op("Round", [x], "code")
            out = op("Mul", [x, const("out_scale", params.p_max / n)], "out")
        else:
            g0, g1 = params.ends()
            x = op("Mul", [p, const("in_scale", 1.0 / params.p_max)], "x")
            x = op("Clip", [x, const("x_lo", 0.0), const("x_hi", 1.0)], "x_clip")
            x = op("Mul", [x, const("alpha", params.alpha)], "ax")
            x = op("Sub", [x, const("ac", params.alpha * params.center)], "arg")
            x = op("Tan", [x], "tan")
            x = op("Sub", [x, const("g0", g0)], "shifted")
            x = op("Mul", [x, const("to_code", n / (g1 - g0))], "u")
            x = op("Clip", [x, const("lo", 0.0), const("hi", n)], "clip")
            x = op("Round", [x], "code")
            x = op("Mul", [x, const("from_code", (g1 - g0) / n)], "g")
            x = op("Add", [x, const("g0_back", g0)], "g_abs")
            x = op("Atan", [x], "atan")
            x = op("Mul", [x, const("out_scale", params.p_max / params.alpha)], "scaled")
            out = op("Add", [x, const("out_shift", params.p_max * params.center)], "out")
        graph.insert_before(consumer, nodes)
        return out
