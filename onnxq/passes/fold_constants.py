"""Constant folding, dead-code removal and lifting of constants to initializers.

Recognises every node whose inputs are all constants (initializers that are not
graph inputs, or ``Constant`` outputs) and replaces it by an initializer holding
its value, evaluated by onnxscript's folder (``onnxscript.optimizer.fold_constants``,
the public entry point to onnxscript 0.7's private ``FoldConstantsPass``).  Then
removes nodes and initializers nothing reads
(:class:`onnx_ir.passes.common.RemoveUnusedNodesPass`) and lifts the remaining
tensor ``Constant`` nodes to initializers
(:class:`onnx_ir.passes.common.LiftConstantsToInitializersPass`).

Size limits: a node with a constant input of more than ``input_size_limit``
elements is not folded, and a folded result of more than ``output_size_limit``
elements is only stored if it does not grow the model.  The exception is
``Transpose``: a ``Transpose`` of a large weight whose only reader is that
``Transpose`` is always folded into a transposed initializer, which is the
``Transpose(W) -> MatMul`` form legacy exporters emit.  A weight shared with
another reader (tied embeddings) keeps its ``Transpose`` so the weight is not
duplicated.
"""

from __future__ import annotations

__all__ = ["FoldConstantsPass"]

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

logger = logging.getLogger(__name__)

# onnxscript 0.7's own defaults, restated so this module needs no private import.
DEFAULT_INPUT_SIZE_LIMIT = 8192
DEFAULT_OUTPUT_SIZE_LIMIT = 512 * 512


def _node_signature(model: ir.Model) -> list[tuple[int, int, int, tuple[str | None, ...]]]:
    """A cheap fingerprint of node identities, arities and output names.

    ``RemoveUnusedNodesPass`` also trims trailing empty inputs and unused optional
    outputs without counting them; comparing this signature catches those edits.
    """
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    return [
        (id(node), len(node.inputs), len(node.outputs), tuple(o.name for o in node.outputs))
        for graph in graphs
        for node in ir.traversal.RecursiveGraphIterator(graph)
    ]


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subgraphs, drop dead code and lift constants to initializers.

    Attributes:
        input_size_limit: Nodes with a constant input larger than this many
            elements are not folded (``Transpose`` of a singly-used weight is).
        output_size_limit: Folded results larger than this many elements are
            only stored when they replace at least as many input elements.
        shape_inference: Run ONNX node-level shape inference while folding.
        lift_size_limit: ``Constant`` tensors with at least this many elements
            are lifted to initializers; 0 lifts them all.
    """

    def __init__(
        self,
        *,
        input_size_limit: int = DEFAULT_INPUT_SIZE_LIMIT,
        output_size_limit: int = DEFAULT_OUTPUT_SIZE_LIMIT,
        shape_inference: bool = False,
        lift_size_limit: int = 0,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference
        self.lift_size_limit = lift_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # fold_constants builds a fresh onnxscript folder per call (it keeps per-run state).
        folded = onnxscript.optimizer.fold_constants(
            model,
            onnx_shape_inference=self.shape_inference,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        ).modified

        before = _node_signature(model)
        removed = common_passes.RemoveUnusedNodesPass()(model).modified
        trimmed = _node_signature(model) != before

        lifted = common_passes.LiftConstantsToInitializersPass(
            lift_all_constants=False, size_limit=self.lift_size_limit
        )(model).modified

        modified = folded or removed or trimmed or lifted
        logger.debug(
            "FoldConstantsPass: folded=%s removed=%s trimmed=%s lifted=%s",
            folded,
            removed,
            trimmed,
            lifted,
        )
        return ir.passes.PassResult(model, modified)
