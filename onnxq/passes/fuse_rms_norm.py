"""Fuse decomposed RMS normalisation into ``RMSNormalization`` (opset >= 23).

Recognises the decomposition that torch.onnx emits for LLaMA/Qwen/Mamba-style
RMSNorm (``x * rsqrt(mean(x²) + eps) * γ``) over the last axis::

    ms = ReduceMean(Pow(x, 2) | Mul(x, x), axes=[-1])    # keepdims=1
    r  = Sqrt(Add(ms, eps))
    n  = Div(x, r) | Mul(x, Reciprocal(r))                # operands in either order
    y  = Mul(n, gamma)                                    # optional; constant, either order

and rewrites it as ``y = RMSNormalization(x, gamma, axis=-1, epsilon=eps)`` — the
same function, ``x / sqrt(mean(x²) + eps) * gamma`` (Zhang & Sennrich 2019). Without
the ``Mul(gamma)`` tail the scale is ones. The fused node keeps the pattern's output
name and the metadata of its last node plus ``onnxq.pass = "FuseRMSNormPass"``.
Below opset 23 (where ``RMSNormalization`` does not exist) the pass does nothing.
"""

from __future__ import annotations

__all__ = ["FuseRMSNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes import _ir_utils as utils
from onnxq.passes.fuse_layer_norm import _is, _last_dim, _mean_eps_sqrt, _other, _vector_operand

logger = logging.getLogger(__name__)

_MIN_OPSET = 23


def _match(square: ir.Node):
    """Match the pattern rooted at the square of ``x``; a string is the rejection reason."""
    x = square.inputs[0]
    if x is None:
        return "square has no input"
    constants: list[ir.Value | None] = []
    if _is(square, "Pow"):
        if utils.scalar(square.inputs[1]) != 2.0:
            return "Pow exponent is not 2"
        constants.append(square.inputs[1])
    elif not (_is(square, "Mul") and square.inputs[0] is x and square.inputs[1] is x):
        return "not a square"
    found = _mean_eps_sqrt(square, x, constants)
    if isinstance(found, str):
        return found
    tail, epsilon = found
    sqrt = tail[-1]
    nodes = [square, *tail]
    reader = utils.single_consumer(sqrt.outputs[0])
    if _is(reader, "Div"):
        if reader.inputs[0] is not x or reader.inputs[1] is not sqrt.outputs[0]:
            return "Div is not x / rms"
        norm = reader
    elif _is(reader, "Reciprocal"):
        norm = utils.single_consumer(reader.outputs[0])
        if not _is(norm, "Mul") or _other(norm, reader.outputs[0]) is not x:
            return "Reciprocal is not multiplied with x"
        nodes.append(reader)
    else:
        return "rms is not used by Div or Reciprocal"
    nodes.append(norm)
    size = _last_dim(x)
    output = norm.outputs[0]
    gamma = None
    mul = utils.single_consumer(output)
    found_gamma = None if output.is_graph_output() else _vector_operand(mul, "Mul", output, x, size)
    if found_gamma is not None:
        gamma, gamma_value = found_gamma
        size = gamma.size
        constants.append(gamma_value)
        nodes.append(mul)
        output = mul.outputs[0]
    if gamma is None:
        if size is None:
            return "no gamma and the last dimension is unknown"
        gamma = np.ones(size, dtype=np.float32)
    for node in nodes[:-1]:
        out = node.outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return "an intermediate value has other readers"
    return x, nodes, output, float(epsilon), gamma, constants


class FuseRMSNormPass(ir.passes.InPlacePass):
    """Rewrite decomposed RMSNorm chains as ``RMSNormalization`` nodes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if utils.opset(model) < _MIN_OPSET:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.graph is not graph or not (_is(node, "Pow") or _is(node, "Mul")):
                continue
            found = _match(node)
            if isinstance(found, str):
                continue
            x, nodes, output, epsilon, gamma, constants = found
            last = nodes[-1]
            g = utils.make_initializer(graph, f"{output.name or 'rms'}_gamma",
                                       gamma.astype(np.float32))
            fused_out = ir.Value(name=None, type=output.type, shape=output.shape)
            fused = ir.node(
                "RMSNormalization", [x, g], {"axis": -1, "epsilon": epsilon},
                outputs=[fused_out], name=utils.unique_name(graph, f"{last.name or 'rms'}_fused"),
            )
            utils.tag(fused, "FuseRMSNormPass", last)
            graph.insert_before(last, fused)
            name = output.name
            output.replace_all_uses_with(fused_out, replace_graph_outputs=True)
            graph.remove(nodes, safe=True)
            fused_out.name = name
            utils.drop_if_dead(constants)
            count += 1
        if count:
            logger.info("Fused %s RMSNorm patterns", count)
        return ir.passes.PassResult(model, bool(count))
