"""Quantized linears whose bias nothing absorbs, rewritten as ``Gemm`` with an int32 bias.

onnxruntime CPU turns ``DQ(x) · DQ(W)`` into ``MatMulIntegerToFloat`` but has no
QDQ rule that takes the following bias ``Add`` along: the Add runs as its own
pass over the output.  Most biases of a transformer are absorbed anyway (the
FFN-up bias by ``BiasGelu``, the output projections' by
``SkipLayerNormalization``), but those of the Q/K/V projections feed only
layout ops (Reshape/Transpose to heads) and a QuantizeLinear.  The QDQ ``Gemm``
node unit is fused with its bias: ``DQ(x2d), DQ(W), DQ(b_int32) -> Gemm (-> Q)``
becomes ``QGemm``, which adds the bias to the int32 accumulator and, when a
QuantizeLinear follows (after onnxruntime moves it up across the layout ops),
writes uint8 directly.

The rewrite, for ``y = DQ(Q(x)) · DQ(W_q) + b`` with ``x`` of shape ``[..., K]``::

    x2 = Reshape(x, [-1, K]);  a = DQ(Q(x2))              # same scale / zero point
    b_q = round(b / (s_x · s_w))  (int32, per output channel when s_w is)
    y  = Reshape(Gemm(a, DQ(W_q), DQ(b_q; s_x · s_w)), shape(x)[:-1] + [N])

The restoring Reshape is left out when every reader of ``y`` is itself a Reshape
that does not copy dimensions from its input (the usual view to heads).

Exact up to the bias rounding (at most ``s_x · s_w / 2`` per channel, far below
the activation's own quantization step).  Only linears whose bias ``Add`` feeds
nothing but ``Reshape``/``Transpose``/``QuantizeLinear`` are rewritten; the
others keep the form that onnxruntime's GELU/LayerNorm fusions absorb.  Used by
:class:`~onnxq.passes.insert_qdq.InsertQDQPass` for targets with
``lower_bias_gemm`` (``ort-cpu``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import const_array, drop_if_dead, make_initializer, tag, unique_name

__all__ = ["BiasGemmResult", "QuantizedBiasGemmPass"]

PASS_NAME = "QuantizedBiasGemmPass"
_PASS_THROUGH = {"Reshape", "Transpose", "QuantizeLinear"}
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class BiasGemmResult(ir.passes.PassResult):
    """Which linears became ``Gemm`` (their ``onnxq.module`` or node name)."""

    lowered: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Match:
    add: ir.Node
    matmul: ir.Node
    bias: np.ndarray
    q: ir.Node  # QuantizeLinear of the activation
    a_dq: ir.Node
    w_dq: ir.Node
    w_scale: np.ndarray
    a_scale: float
    k: int
    n: int


def _dq_of_quantize(value: ir.Value) -> tuple[ir.Node, ir.Node, float] | None:
    """``value = DQ(Q(x))`` with one constant per-tensor scale: (Q, DQ, scale)."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None:
        return None
    scale = const_array(dq.inputs[1])
    q_scale = const_array(q.inputs[1]) if len(q.inputs) > 1 else None
    if scale is None or q_scale is None or scale.size != 1 or q_scale.size != 1:
        return None
    if float(scale.reshape(())) != float(q_scale.reshape(())):
        return None
    zps = [const_array(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] is not None else None
           for n in (q, dq)]
    if any(z is None or z.size != 1 for z in zps) or int(zps[0]) != int(zps[1]):
        return None
    return q, dq, float(scale.reshape(()))


def _int8_weight(value: ir.Value, k_expected: int | None) -> tuple[ir.Node, np.ndarray] | None:
    """``value = DQ(W_q)`` with a constant 2-D int8 weight, zero zero points, and a
    per-tensor or per-output-channel (axis 1) scale: (DQ, scale as [N] or scalar)."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    w = const_array(dq.inputs[0])
    scale = const_array(dq.inputs[1])
    if w is None or scale is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    if k_expected is not None and w.shape[0] != k_expected:
        return None
    if dq.attributes.get("block_size") is not None:
        return None
    if scale.ndim == 1:
        axis = dq.attributes.get_int("axis", 1)
        if axis not in (1, -1) or scale.shape[0] != w.shape[1]:
            return None
    elif scale.size != 1:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zp = const_array(dq.inputs[2])
        if zp is None or np.any(zp != 0):
            return None
    return dq, scale.astype(np.float32)


def _match(add: ir.Node) -> _Match | None:
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    out = add.outputs[0]
    if out.is_graph_output() or not out.uses():
        return None
    if any(u.node.op_type not in _PASS_THROUGH or u.idx != 0 for u in out.uses()):
        return None
    for i in (0, 1):
        mm_val, b_val = add.inputs[i], add.inputs[1 - i]
        mm = mm_val.producer() if mm_val is not None else None
        bias = const_array(b_val)
        if mm is None or mm.op_type != "MatMul" or bias is None or bias.ndim != 1:
            continue
        if len(mm_val.uses()) != 1 or mm_val.is_graph_output():
            return None
        act = _dq_of_quantize(mm.inputs[0])
        if act is None:
            return None
        q, a_dq, a_scale = act
        x = q.inputs[0]
        shape = x.shape
        if shape is None or len(shape) < 2 or not isinstance(shape[-1], int):
            return None
        k = shape[-1]
        weight = _int8_weight(mm.inputs[1], k)
        if weight is None:
            return None
        w_dq, w_scale = weight
        n = const_array(w_dq.inputs[0]).shape[1]
        if bias.shape[0] != n:
            return None
        return _Match(add, mm, bias.astype(np.float32), q, a_dq, w_dq, w_scale, a_scale, k, n)
    return None


def _reshaped_by_consumers(value: ir.Value) -> bool:
    """Every reader is a ``Reshape`` of ``value`` whose target shape does not copy
    dimensions from its input, so a 2-D ``[rows, N]`` input gives the same result
    as ``[..., N]``: a constant target without zeros, or one computed at run time
    (``Concat`` of shape arithmetic, whose zeros could only come from an empty
    tensor)."""
    for use in value.uses():
        node = use.node
        if node.op_type != "Reshape" or use.idx != 0 or len(node.inputs) < 2:
            return False
        if node.attributes.get_int("allowzero", 0):
            continue
        target = const_array(node.inputs[1])
        if target is not None:
            if np.any(target == 0):
                return False
            continue
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "Concat":
            return False
        for part in producer.inputs:
            c = const_array(part)
            if c is not None and np.any(c == 0):
                return False
    return True


def _const_i64(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return make_initializer(graph, name, np.asarray(values, dtype=np.int64))


class QuantizedBiasGemmPass(ir.passes.InPlacePass):
    """Rewrite quantized ``MatMul + Add(bias)`` feeding only layout ops as QDQ ``Gemm``."""

    def call(self, model: ir.Model) -> BiasGemmResult:
        graph = model.graph
        matches = [m for m in (_match(node) for node in graph) if m is not None]
        result = BiasGemmResult(model, False)
        rows: dict[int, ir.Value] = {}  # id(Q node) -> DQ of the 2-D activation
        lead: dict[int, ir.Value] = {}  # id(Q node) -> shape(x)[:-1]
        for m in matches:
            bias_scale = (np.float64(m.a_scale) * m.w_scale.astype(np.float64)).astype(np.float32)
            b_q = np.rint(m.bias.astype(np.float64) / bias_scale.astype(np.float64))
            if not np.all(np.isfinite(b_q)) or np.abs(b_q).max(initial=0) > _INT32_MAX:
                continue
            self._lower(graph, m, b_q.astype(np.int32), bias_scale, rows, lead)
            result.lowered.append(m.matmul.metadata_props.get("onnxq.module")
                                  or m.matmul.name or "")
            result.modified = True
        if result.modified:
            graph.sort()
        return result

    def _lower(self, graph: ir.Graph, m: _Match, b_q: np.ndarray, bias_scale: np.ndarray,
               rows: dict[int, ir.Value], lead: dict[int, ir.Value]) -> None:
        x = m.q.inputs[0]
        base = m.add.outputs[0].name or m.matmul.name or "linear"
        new: list[ir.Node] = []

        def node(op: str, inputs, name: str, **attrs) -> ir.Value:
            out = ir.Value(name=unique_name(graph, name))
            n = ir.node(op, inputs, attributes=attrs or None, outputs=[out],
                        name=unique_name(graph, name + "_node"))
            tag(n, PASS_NAME, m.matmul)  # keeps the linear's onnxq.module
            new.append(n)
            return out

        rank = len(x.shape)
        a = rows.get(id(m.q))
        if a is None:
            q_in = x
            if rank > 2:
                q_in = node("Reshape", [x, _const_i64(graph, f"{base}_rows_shape", [-1, m.k])],
                            f"{x.name or base}_rows")
                q_in.dtype, q_in.shape = x.dtype or ir.DataType.FLOAT, ir.Shape([None, m.k])
            q_out = ir.Value(name=unique_name(graph, f"{q_in.name}_quantized"))
            qn = ir.node("QuantizeLinear", [q_in, *m.q.inputs[1:]],
                         attributes=dict(m.q.attributes),
                         outputs=[q_out], name=unique_name(graph, f"{q_in.name}_QuantizeLinear"))
            tag(qn, PASS_NAME, m.q)
            new.append(qn)
            zp = const_array(m.q.inputs[2]) if len(m.q.inputs) > 2 else None
            q_out.dtype = m.q.outputs[0].dtype or (
                ir.DataType.from_numpy(zp.dtype) if zp is not None else ir.DataType.UINT8)
            a = node("DequantizeLinear", [q_out, *m.a_dq.inputs[1:]], f"{q_in.name}_dequantized")
            a.dtype, a.shape = ir.DataType.FLOAT, q_in.shape
            rows[id(m.q)] = a
        bq_val = make_initializer(graph, f"{base}_bias_int32", b_q)
        bs_val = make_initializer(graph, f"{base}_bias_scale", bias_scale)
        dq_attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
        b_dq = node("DequantizeLinear", [bq_val, bs_val], f"{base}_bias_dequantized", **dq_attrs)
        b_dq.dtype, b_dq.shape = ir.DataType.FLOAT, ir.Shape([m.n])
        y2 = node("Gemm", [a, m.matmul.inputs[1], b_dq], f"{base}_gemm")
        y2.dtype, y2.shape = ir.DataType.FLOAT, ir.Shape([None, m.n])
        old = m.add.outputs[0]
        if rank > 2 and not _reshaped_by_consumers(old):
            shp = lead.get(id(m.q))
            if shp is None:
                full = node("Shape", [x], f"{x.name or base}_shape")
                full.dtype = ir.DataType.INT64
                shp = node("Slice", [full, _const_i64(graph, f"{base}_zero", [0]),
                                     _const_i64(graph, f"{base}_minus_one", [-1])],
                           f"{x.name or base}_lead_dims")
                shp.dtype = ir.DataType.INT64
                lead[id(m.q)] = shp
            target = node("Concat", [shp, _const_i64(graph, f"{base}_n", [m.n])],
                          f"{base}_shape", axis=0)
            target.dtype = ir.DataType.INT64
            y = node("Reshape", [y2, target], f"{base}_restored")
            y.dtype, y.shape = old.dtype or ir.DataType.FLOAT, old.shape
        else:
            y = y2
        graph.insert_before(m.add, new)
        old.replace_all_uses_with(y)
        name = old.name
        dead_inputs = [m.add.inputs[0], m.add.inputs[1]]
        graph.remove(m.add, safe=True)
        graph.remove(m.matmul, safe=True)
        graph.remove(m.a_dq, safe=True)
        if not m.q.outputs[0].uses():
            graph.remove(m.q, safe=True)
        drop_if_dead(dead_inputs + list(m.a_dq.inputs[1:]))
        if name:
            y.name = name
