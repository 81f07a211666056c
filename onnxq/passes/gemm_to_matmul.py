"""Rewrite ``Gemm`` with a constant weight as ``MatMul`` (+ ``Add``).

Recognises ``Y = Gemm(A, B, C)`` (``C`` optional) with ``transA = 0``, ``B`` a
constant and ``C`` absent or constant, for any ``alpha``, ``beta`` and
``transB``.  Since ``Gemm`` computes ``Y = alpha * A @ op(B) + beta * C`` with
``op(B) = B^T`` when ``transB = 1``, it is rewritten as::

    Y = Add(MatMul(A, B'), C')      B' = alpha * op(B)   ([K, N])
                                    C' = beta * C

The ``Add`` is omitted when ``C`` is absent or ``beta = 0``.  ``B'``/``C'`` are new
initializers named after the originals unless no scaling or transposition is
needed, in which case the original values are reused.  Because ``C`` broadcasts
unidirectionally to ``[M, N]`` in ``Gemm``, the bidirectional broadcast of ``Add``
gives the same shape.  This is the canonical linear layer onnxq's later passes
look for: a ``MatMul`` with a constant ``[K, N]`` weight.

``Gemm`` with ``transA = 1``, a non-constant ``B`` or a non-constant ``C`` is left
alone, as is an integer ``Gemm`` whose ``alpha``/``beta`` are not 1.  The output
keeps its name; new nodes copy the ``Gemm``'s metadata and are tagged
``onnxq.pass = "GemmToMatMulPass"``.
"""

from __future__ import annotations

__all__ = ["GemmToMatMulPass"]

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes import _ir_utils as utils

logger = logging.getLogger(__name__)


class GemmToMatMulPass(ir.passes.InPlacePass):
    """Replace ``Gemm`` nodes with a constant ``B`` by ``MatMul`` and ``Add``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            if self._rewrite(graph, node):
                count += 1
        if count:
            logger.info("Rewrote %s Gemm nodes as MatMul", count)
        return ir.passes.PassResult(model, modified=bool(count))

    def _rewrite(self, graph: ir.Graph, gemm: ir.Node) -> bool:
        if gemm.attributes.get_int("transA", 0) != 0:
            logger.debug("Gemm %r left alone: transA=1", gemm.name)
            return False
        a = gemm.inputs[0]
        b_value = gemm.inputs[1]
        c_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        b = utils.const_array(b_value)
        c = utils.const_array(c_value) if c_value is not None else None
        if a is None or b_value is None or b is None or b.ndim != 2:
            logger.debug("Gemm %r left alone: B is not a constant matrix", gemm.name)
            return False
        if c_value is not None and c is None:
            logger.debug("Gemm %r left alone: C is not constant", gemm.name)
            return False
        alpha = gemm.attributes.get_float("alpha", 1.0)
        beta = gemm.attributes.get_float("beta", 1.0)
        trans_b = gemm.attributes.get_int("transB", 0) != 0
        if b.dtype.kind != "f" and (alpha != 1.0 or (c is not None and beta != 1.0)):
            logger.debug("Gemm %r left alone: integer Gemm with scaling", gemm.name)
            return False

        base = gemm.name or gemm.outputs[0].name or "Gemm"
        if alpha == 1.0 and not trans_b:
            weight = b_value
        else:
            array = (b.T if trans_b else b) * np.asarray(alpha, dtype=b.dtype)
            weight = utils.make_initializer(
                graph, f"{b_value.name or base}_matmul", array.astype(b.dtype)
            )
        new_nodes = [
            ir.node("MatMul", [a, weight], name=utils.unique_name(graph, f"{base}/MatMul"))
        ]
        if c is not None and beta != 0.0:
            if beta == 1.0:
                bias = c_value
            else:
                bias = utils.make_initializer(
                    graph,
                    f"{c_value.name or base}_bias",
                    (c * np.asarray(beta, dtype=c.dtype)).astype(c.dtype),
                )
            new_nodes.append(
                ir.node(
                    "Add",
                    [new_nodes[0].outputs[0], bias],
                    name=utils.unique_name(graph, f"{base}/Add"),
                )
            )
        for node in new_nodes:
            utils.tag(node, type(self).__name__, source=gemm)
        if len(new_nodes) == 2:
            # The MatMul's product is an internal value; name it after the output.
            product = new_nodes[0].outputs[0]
            product.name = utils.unique_name(graph, f"{gemm.outputs[0].name or base}_matmul")
            product.type = gemm.outputs[0].type

        ir.convenience.replace_nodes_and_values(
            graph, gemm, [gemm], new_nodes, [gemm.outputs[0]], [new_nodes[-1].outputs[0]]
        )
        utils.drop_if_dead([b_value, c_value])
        return True
