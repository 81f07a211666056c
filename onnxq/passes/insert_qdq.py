"""Insert QuantizeLinear/DequantizeLinear pairs for a target profile (static W8A8).

For every selected linear layer ``y = x @ W (+ b)``:

* the activation ``x`` gets ``x -> QuantizeLinear(s_x, z_x) -> DequantizeLinear``
  with a per-tensor scale from the calibration statistics (asymmetric uint8 for
  onnxruntime CPU, symmetric int8 with a zero point of 0 for TensorRT/Jetson);
* the weight is stored as an int8 initializer ``W_q = round(W / s_w)`` with a
  per-output-channel scale ``s_w[n] = max_k |W[k, n]| / 127`` (``axis=1`` of the
  ``[K, N]`` MatMul weight) and read through ``DequantizeLinear``.

Attention MatMuls (Q·Kᵀ and P·V) get per-tensor Q/DQ on both inputs when the
target quantizes them. LayerNorm, Softmax inputs, GELU and the attention-mask
Add are never wrapped: the mask holds float32-min values that destroy any
per-tensor grid (see ``deploy-rules.md`` B4).

The pass reads only a :class:`~onnxq.calibration.stats.Stats` object and refuses
statistics computed on another graph.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.calibration.observers import qparams
from onnxq.calibration.stats import Stats, graph_fingerprint
from onnxq.errors import OnnxqError, StatsMismatchError
from onnxq.passes._patterns import (
    const_array,
    find_attention_matmuls,
    find_linears,
    module_of,
)
from onnxq.targets.profiles import TargetProfile

__all__ = [
    "InsertQDQPass",
    "QDQResult",
    "QuantizedTensor",
    "quantize_weight_blocked_int4",
    "quantize_weight_per_channel",
]

logger = logging.getLogger(__name__)

PASS_TAG = "InsertQDQPass"


@dataclasses.dataclass
class QuantizedTensor:
    """One activation that received a Q/DQ pair (for the report)."""

    name: str
    module: str
    kind: str  # "linear-input", "attention-qk", "attention-pv"
    scale: float
    zero_point: int
    range: tuple[float, float]
    method: str


@dataclasses.dataclass
class QDQResult(ir.passes.PassResult):
    activations: list[QuantizedTensor] = dataclasses.field(default_factory=list)
    weights: list[str] = dataclasses.field(default_factory=list)
    kept_fp: list[str] = dataclasses.field(default_factory=list)
    embeddings: list[str] = dataclasses.field(default_factory=list)


def quantize_weight_per_channel(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of a ``[K, N]`` weight.

    Returns ``(w_q int8 [K, N], scale float32 [N])`` with ``w ≈ w_q * scale``.
    All-zero columns get the smallest positive float32 scale (TensorRT rejects
    zero scales).
    """
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=0).astype(np.float64)
    scale = np.maximum(amax / qmax, np.finfo(np.float32).tiny).astype(np.float32)
    # In place on one float64 copy: a weight of several hundred MB is not duplicated
    # once per operation.
    w_q = w.astype(np.float64)
    w_q /= scale.astype(np.float64)
    np.rint(w_q, out=w_q)
    np.clip(w_q, -qmax, qmax, out=w_q)
    return w_q.astype(np.int8), scale


def _matches(patterns: Collection[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


class _Namer:
    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for v in graph.initializers.values()}
        self.used.update(v.name for v in graph.inputs)
        for node in graph:
            self.used.update(o.name for o in node.outputs if o.name)
            if node.name:
                self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


class InsertQDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ around linear-layer and attention MatMuls for ``target``.

    Args:
        stats: calibration statistics of exactly this graph.
        target: the deployment profile (activation dtype, symmetry, attention).
        method: range estimator for activations ("minmax", "percentile", "entropy", "mse").
        methods: per-tensor overrides of ``method`` (value name -> method).
        keep_fp: module paths or value names (glob patterns allowed) whose linear
            layers stay in floating point.
        quantize_attention: override ``target.quantize_attention_matmuls``.
        weight_bits: 8 (per-channel int8) or 4 (blocked int4 along the input axis,
            ``DequantizeLinear(axis=0, block_size)``, opset 21; W4A8). Weights whose
            input size is not a multiple of ``block_size`` stay int8.
        block_size: rows per int4 block (TensorRT accepts 64 and 128).
    """

    def __init__(
        self,
        *,
        stats: Stats,
        target: TargetProfile,
        method: str = "minmax",
        methods: Mapping[str, str] | None = None,
        keep_fp: Collection[str] = (),
        quantize_attention: bool | None = None,
        weight_bits: int = 8,
        block_size: int = 128,
    ) -> None:
        super().__init__()
        if weight_bits not in (4, 8):
            raise OnnxqError(f"weight bits must be 8 or 4, not {weight_bits}")
        self.weight_bits = weight_bits
        self.block_size = block_size
        self.stats = stats
        self.target = target
        self.method = method
        self.methods = dict(methods or {})
        self.keep_fp = tuple(keep_fp)
        self.quantize_attention = (
            target.quantize_attention_matmuls if quantize_attention is None else quantize_attention
        )

    def requires(self, model: ir.Model) -> None:
        fp = graph_fingerprint(model)
        if fp != self.stats.fingerprint:
            raise StatsMismatchError(
                "statistics were computed on a different graph "
                f"(fingerprint {self.stats.fingerprint[:12]} != {fp[:12]}); recalibrate"
            )

    def call(self, model: ir.Model) -> QDQResult:
        graph = model.graph
        namer = _Namer(graph)
        result = QDQResult(model, False)
        act_q: dict[int, ir.Value] = {}
        weight_dq: dict[int, ir.Value] = {}

        jobs: list[tuple[ir.Node, int, str]] = []  # (consumer, input index, kind)
        for unit in find_linears(graph):
            if _matches(self.keep_fp, unit.module, unit.matmul.name or "", unit.weight.name or ""):
                result.kept_fp.append(unit.module or unit.matmul.name or "")
                continue
            jobs.append((unit.matmul, 0, "linear-input"))
            jobs.append((unit.matmul, 1, "weight"))
        if self.quantize_attention:
            for att in find_attention_matmuls(graph):
                if _matches(self.keep_fp, att.module, att.node.name or ""):
                    result.kept_fp.append(att.module or att.node.name or "")
                    continue
                jobs.append((att.node, 0, f"attention-{att.kind}"))
                jobs.append((att.node, 1, f"attention-{att.kind}"))

        for consumer, idx, kind in jobs:
            value = consumer.inputs[idx]
            if kind == "weight":
                dq = weight_dq.get(id(value))
                if dq is None:
                    dq = self._quantize_weight(graph, consumer, value, namer)
                    weight_dq[id(value)] = dq
                    result.weights.append(value.name or "")
            else:
                # One QuantizeLinear per tensor, one DequantizeLinear per consumer:
                # onnxruntime fuses a DQ -> MatMul node unit only when the DQ has a
                # single consumer, and TensorRT prefers dedicated pairs too.
                q_out = act_q.get(id(value))
                if q_out is None:
                    q_out, record = self._quantize_activation(graph, consumer, value, kind, namer)
                    act_q[id(value)] = q_out
                    result.activations.append(record)
                dq = self._dequantize(graph, consumer, value, q_out, namer)
            consumer.replace_input_with(idx, dq)
            result.modified = True

        if self.quantize_attention and self.target.fold_attention_scale:
            result.modified |= self._fold_attention_scales(graph, namer) > 0
        if self.target.lower_bias_gemm:
            from onnxq.passes.bias_gemm import QuantizedBiasGemmPass

            result.modified |= QuantizedBiasGemmPass()(model).modified

        # Float weights that no longer have users are dropped.
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and id(value) in weight_dq:
                del graph.initializers[name]
        if result.modified:
            graph.sort()
        logger.info(
            "Inserted Q/DQ on %s activations and %s weights", len(act_q), len(weight_dq)
        )
        return result

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "QuantizeLinear" and node.metadata_props.get("onnxq.pass") == PASS_TAG:
                scale = const_array(node.inputs[1])
                if scale is None or not np.all(scale > 0):
                    raise OnnxqError(f"non-positive scale inserted at {node.name}")

    # -- helpers ---------------------------------------------------------------------------

    def _fold_attention_scales(self, graph: ir.Graph, namer: _Namer) -> int:
        """Fold ``MatMul(DQ(q), DQ(k)) -> Mul(c > 0)`` into the K-side DQ scale.

        ``DQ(k; s, z) * c == DQ(k; s * c, z)``, so the scores are unchanged up to float
        rounding; the K-side DQ is dedicated to this MatMul (one DQ per consumer).
        """
        folded = 0
        for att in find_attention_matmuls(graph):
            mm = att.node
            if att.kind != "qk" or len(mm.outputs[0].uses()) != 1 or mm.outputs[0].is_graph_output():
                continue
            dq = mm.inputs[1].producer() if mm.inputs[1] is not None else None
            if (dq is None or dq.op_type != "DequantizeLinear"
                    or dq.metadata_props.get("onnxq.pass") != PASS_TAG
                    or len(dq.outputs[0].uses()) != 1):
                continue
            mul = next(iter(mm.outputs[0].uses())).node
            if mul.op_type != "Mul" or len(mul.inputs) != 2 or mul.outputs[0].is_graph_output():
                continue
            other = mul.inputs[1] if mul.inputs[0] is mm.outputs[0] else mul.inputs[0]
            c = const_array(other)
            scale = const_array(dq.inputs[1])
            if c is None or c.size != 1 or not float(c.reshape(())) > 0 or scale is None:
                continue
            new_scale = (scale.astype(np.float64) * float(c.reshape(()))).astype(np.float32)
            base = dq.inputs[1].name or "attention"
            s_val = _initializer(graph, namer(f"{base}_folded_scale"), new_scale)
            dq.replace_input_with(1, s_val)
            mul.outputs[0].replace_all_uses_with(mm.outputs[0])
            out_name = mul.outputs[0].name
            graph.remove(mul, safe=True)
            if out_name:  # keep the scores' name for reports and taps
                old = mm.outputs[0].name
                mm.outputs[0].name = out_name
                if old:
                    namer.used.add(old)
            folded += 1
        if folded:
            logger.info("Folded %s attention score scales into K-side DequantizeLinear", folded)
        return folded

    def _quantize_activation(
        self, graph: ir.Graph, consumer: ir.Node, value: ir.Value, kind: str, namer: _Namer
    ) -> tuple[ir.Value, QuantizedTensor]:
        name = value.name or namer("activation")
        if name not in self.stats:
            raise OnnxqError(
                f"no calibration statistics for tensor {name!r} "
                f"(input of {module_of(consumer)}); recalibrate"
            )
        method = self.methods.get(name, self.method)
        lo, hi = self.stats.range(name, method)
        if kind == "attention-pv" and _is_unit_clip(value):
            # A clipped softmax (Bondarenko et al. 2023) is exactly in [0, 1] with true
            # zeros and ones: a fixed grid, independent of the calibration data.
            lo, hi, method = 0.0, 1.0, "fixed[0,1]"
        scale, zp = qparams(
            lo, hi, dtype=self.target.activation_dtype, symmetric=self.target.activation_symmetric
        )
        np_dtype = np.int8 if self.target.activation_dtype == "int8" else np.uint8
        s_val = _initializer(graph, namer(f"{name}_scale"), np.array(scale, dtype=np.float32))
        z_val = _initializer(graph, namer(f"{name}_zero_point"), np.array(zp, dtype=np_dtype))
        meta = {"onnxq.pass": PASS_TAG, "onnxq.module": module_of(consumer)}
        q_out = ir.Value(name=namer(f"{name}_quantized"))
        q = ir.node(
            "QuantizeLinear", [value, s_val, z_val], outputs=[q_out],
            name=namer(f"{name}_QuantizeLinear"), metadata_props=dict(meta),
        )
        q_out.dtype = ir.DataType.INT8 if np_dtype is np.int8 else ir.DataType.UINT8
        q_out.shape = value.shape
        graph.insert_before(consumer, [q])
        record = QuantizedTensor(
            name=name, module=module_of(consumer), kind=kind, scale=scale, zero_point=zp,
            range=(float(lo), float(hi)), method=method,
        )
        return q_out, record

    def _dequantize(
        self, graph: ir.Graph, consumer: ir.Node, value: ir.Value, q_out: ir.Value, namer: _Namer
    ) -> ir.Value:
        q = q_out.producer()
        assert q is not None
        name = value.name or "activation"
        dq_out = ir.Value(name=namer(f"{name}_dequantized"))
        dq = ir.node(
            "DequantizeLinear", [q_out, q.inputs[1], q.inputs[2]], outputs=[dq_out],
            name=namer(f"{name}_DequantizeLinear"),
            metadata_props={"onnxq.pass": PASS_TAG, "onnxq.module": module_of(consumer)},
        )
        dq_out.dtype = value.dtype or ir.DataType.FLOAT
        dq_out.shape = value.shape
        graph.insert_before(consumer, [dq])
        return dq_out

    def _quantize_weight(
        self, graph: ir.Graph, consumer: ir.Node, value: ir.Value, namer: _Namer
    ) -> ir.Value:
        w = const_array(value)
        assert w is not None
        name = value.name or namer("weight")
        blocked = self._int4_block(w.shape[0])
        if blocked:
            return self._quantize_weight_int4(graph, consumer, value, w, name, namer, blocked)
        w_q, scale = quantize_weight_per_channel(w.astype(np.float32, copy=False))
        if not self.target.weight_per_channel:
            scale = np.array(scale.max(), dtype=np.float32)
            w_q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        q_val = _initializer(graph, namer(f"{name}_quantized"), w_q)
        s_val = _initializer(graph, namer(f"{name}_scale"), scale)
        z_val = _initializer(graph, namer(f"{name}_zero_point"), np.zeros(scale.shape, np.int8))
        attrs = {"axis": 1} if scale.ndim == 1 else {}
        dq_out = ir.Value(name=namer(f"{name}_dequantized"))
        dq = ir.node(
            "DequantizeLinear", [q_val, s_val, z_val], attributes=attrs, outputs=[dq_out],
            name=namer(f"{name}_DequantizeLinear"),
            metadata_props={"onnxq.pass": PASS_TAG, "onnxq.module": module_of(consumer)},
        )
        dq_out.dtype = ir.DataType.FLOAT
        dq_out.shape = ir.Shape(list(w.shape))
        graph.insert_before(consumer, [dq])
        return dq_out


    def _int4_block(self, k: int) -> int:
        """The int4 block size to use for a weight with ``k`` input rows, or 0 for int8."""
        if self.weight_bits != 4:
            return 0
        if not self.target.allow_int4_weights:
            raise OnnxqError(f"target {self.target.name} does not accept int4 weights")
        bs = self.block_size
        if bs not in self.target.int4_block_sizes:
            allowed = ", ".join(map(str, self.target.int4_block_sizes))
            raise OnnxqError(f"block size {bs} is not allowed for {self.target.name} ({allowed})")
        return bs if k % bs == 0 else 0

    def _quantize_weight_int4(
        self, graph: ir.Graph, consumer: ir.Node, value: ir.Value, w: np.ndarray, name: str,
        namer: _Namer, block: int,
    ) -> ir.Value:
        import ml_dtypes

        w_q, scale = quantize_weight_blocked_int4(w.astype(np.float32), block)
        q_val = _initializer(graph, namer(f"{name}_quantized"), w_q.astype(ml_dtypes.int4))
        s_val = _initializer(graph, namer(f"{name}_scale"), scale)
        z_val = _initializer(graph, namer(f"{name}_zero_point"),
                             np.zeros(scale.shape, np.int8).astype(ml_dtypes.int4))
        dq_out = ir.Value(name=namer(f"{name}_dequantized"))
        dq = ir.node(
            "DequantizeLinear", [q_val, s_val, z_val], attributes={"axis": 0, "block_size": block},
            outputs=[dq_out], name=namer(f"{name}_DequantizeLinear"),
            metadata_props={"onnxq.pass": PASS_TAG, "onnxq.module": module_of(consumer)},
        )
        dq_out.dtype = ir.DataType.FLOAT
        dq_out.shape = ir.Shape(list(w.shape))
        graph.insert_before(consumer, [dq])
        return dq_out


def _is_unit_clip(value: ir.Value) -> bool:
    """True if ``value`` is ``Clip(x, 0, 1)``."""
    node = value.producer()
    if node is None or node.op_type != "Clip" or len(node.inputs) < 3:
        return False
    lo, hi = const_array(node.inputs[1]), const_array(node.inputs[2])
    return lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 1.0


def quantize_weight_blocked_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 quantization of a ``[K, N]`` weight in blocks of ``block`` rows.

    Returns ``(w_q int8 values in [-7, 7] [K, N], scale float32 [K / block, N])`` with
    ``w[k, n] ≈ w_q[k, n] * scale[k // block, n]`` (DequantizeLinear ``axis=0``,
    ``block_size=block``, opset 21).
    """
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    amax = np.abs(blocks).max(axis=1).astype(np.float64)
    scale = np.maximum(amax / 7.0, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :].astype(np.float64)), -7, 7)
    return q.reshape(k, n).astype(np.int8), scale


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(list(array.shape)),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value
