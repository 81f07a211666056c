"""Decompose ``RMSNormalization`` (opset 23) back into opset-18..22 primitives.

The inverse of :class:`onnxq.passes.fuse_rms_norm.FuseRMSNormPass`, for targets whose
parsers stop below opset 23 (JetPack's TensorRT, ``jetson``)::

    y = RMSNormalization(x, scale, axis=-1, epsilon=eps)
      ->
    ms = ReduceMean(Pow(x, 2), axes=[-1], keepdims=1)
    n  = Div(x, Sqrt(Add(ms, eps)))
    y  = Mul(n, scale)          # left out when scale is a constant of ones

which is exactly the chain ``FuseRMSNormPass`` recognises, so fusing the result gives
the original node back.  ``stash_type`` = 1 (float32, the default) with a non-float32
input computes in float32 through ``Cast`` nodes, as the op's definition says.  Every
inserted node carries the norm's metadata (``onnxq.module`` ...) plus
``onnxq.pass = "DecomposeRMSNormPass"``; the output keeps its name.

Only ``axis = -1`` (or the last axis of a known rank) is handled: other axes are left
in place and listed in ``result.skipped``.  The pass does not change the model's opset
import; the caller lowers it once no opset-23 op is left.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.passes import _ir_utils as utils

__all__ = ["DecomposeRMSNormPass", "DecomposeRMSNormResult"]

_PASS = "DecomposeRMSNormPass"


@dataclasses.dataclass
class DecomposeRMSNormResult(ir.passes.PassResult):
    decomposed: int = 0
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


def _is_last_axis(node: ir.Node) -> bool:
    axis = node.attributes.get_int("axis", -1)
    if axis == -1:
        return True
    shape = node.inputs[0].shape
    return shape is not None and axis == len(shape) - 1


class DecomposeRMSNormPass(ir.passes.InPlacePass):
    """Rewrite every ``RMSNormalization`` (last axis) as Pow/ReduceMean/Add/Sqrt/Div/Mul."""

    def call(self, model: ir.Model) -> DecomposeRMSNormResult:
        graph = model.graph
        result = DecomposeRMSNormResult(model, False)
        for node in list(graph):
            if node.op_type != "RMSNormalization" or node.domain != "":
                continue
            if not _is_last_axis(node):
                result.skipped.append({"node": node.name or "",
                                       "reason": "normalises more than the last axis"})
                continue
            self._decompose(graph, node)
            result.decomposed += 1
        result.modified = bool(result.decomposed)
        if result.modified:
            graph.sort()
        return result

    def _decompose(self, graph: ir.Graph, node: ir.Node) -> None:
        x, scale = node.inputs[0], node.inputs[1]
        eps = node.attributes.get_float("epsilon", 1e-5)
        stash = node.attributes.get_int("stash_type", 1)
        base = node.name or "rms"
        meta = {**node.metadata_props, utils.PASS_KEY: _PASS}
        old = node.outputs[0]
        dtype = x.dtype if x.dtype is not None else old.dtype
        compute = ir.DataType.FLOAT if stash == 1 else (dtype or ir.DataType.FLOAT)
        new_nodes: list[ir.Node] = []

        def add(op: str, inputs, attrs=None, *, out_dtype=None, shape=None) -> ir.Value:
            tag = f"{base}_{op}_{len(new_nodes)}"
            out = ir.Value(name=utils.unique_name(graph, f"{tag}_out"),
                           type=ir.TensorType(out_dtype or compute), shape=shape)
            new_nodes.append(ir.node(op, inputs, attrs or {}, outputs=[out],
                                     name=utils.unique_name(graph, tag),
                                     metadata_props=dict(meta)))
            return out

        np_compute = ir.DataType(compute).numpy()
        two = utils.make_initializer(graph, f"{base}_two", np.array(2.0, np_compute))
        epsv = utils.make_initializer(graph, f"{base}_epsilon", np.array(eps, np_compute))
        axes = utils.make_initializer(graph, f"{base}_axes", np.array([-1], np.int64))
        xc = x
        if dtype is not None and dtype != compute:
            xc = add("Cast", [x], {"to": int(compute)}, shape=x.shape)
        sq = add("Pow", [xc, two], shape=x.shape)
        ms = add("ReduceMean", [sq, axes], {"keepdims": 1})
        ae = add("Add", [ms, epsv])
        rt = add("Sqrt", [ae])
        normed = add("Div", [xc, rt], shape=x.shape)
        if dtype is not None and dtype != compute:
            normed = add("Cast", [normed], {"to": int(dtype)}, out_dtype=dtype, shape=x.shape)
        gamma = utils.const_array(scale)
        if gamma is None or not np.all(gamma == 1):
            normed = add("Mul", [normed, scale], out_dtype=dtype, shape=old.shape)
        graph.insert_before(node, new_nodes)
        name = old.name
        old.replace_all_uses_with(normed, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        utils.drop_if_dead([scale])
        normed.name = name
