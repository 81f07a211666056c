"""Fuse decomposed GELU activations into ``Gelu`` (opset >= 20).

Recognises, in the main graph, the two GELU forms of Hendrycks & Gimpel,
"Gaussian Error Linear Units (GELUs)", 2016:

* exact (erf) GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``::

      u = Div(x, sqrt(2)) | Mul(x, 1/sqrt(2))
      p = Add(Erf(u), 1)

  rewritten as ``Gelu(x, approximate="none")``;

* tanh approximation, ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``::

      c = Pow(x, 3) | Mul(x, Mul(x, x))
      v = Mul(sqrt(2/pi), Add(x, Mul(0.044715, c)))
      p = Add(Tanh(v), 1)

  rewritten as ``Gelu(x, approximate="tanh")``.

In both, the product with ``x`` and ``0.5`` may come in any grouping:
``(x * p) * 0.5``, ``x * (p * 0.5)`` or ``(x * 0.5) * p``.  Every binary
operand pair may be in either order.  Constants match within ``atol`` (1e-4 by
default, widened to the resolution of low-precision constants).  Intermediate
values must have no reader outside the pattern.

The ``Gelu`` node keeps the name of the pattern's output value and the metadata
of its last node, plus ``onnxq.pass = "FuseGeluPass"``.  Below opset 20 (where
``Gelu`` first exists) the pass does nothing.
"""

from __future__ import annotations

__all__ = ["FuseGeluPass"]

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxq.passes import _ir_utils as utils
from onnxq.passes.fuse_layer_norm import _is, _other

logger = logging.getLogger(__name__)

_MIN_OPSET = 20
_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_COEFF = 0.044715


@dataclasses.dataclass
class _Match:
    x: ir.Value
    nodes: list[ir.Node]
    output: ir.Value
    approximate: str
    constants: list[ir.Value | None]


class FuseGeluPass(ir.passes.InPlacePass):
    """Replace erf and tanh GELU decompositions by ``Gelu`` nodes.

    Attributes:
        atol: Absolute tolerance when comparing the pattern's constants
            (sqrt(2), 1, 0.5, sqrt(2/pi), 0.044715) with their exact values.
    """

    def __init__(self, *, atol: float = 1e-4) -> None:
        super().__init__()
        self.atol = atol

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if utils.opset(model) < _MIN_OPSET:
            logger.debug("FuseGeluPass skipped: opset %s < %s", utils.opset(model), _MIN_OPSET)
            return ir.passes.PassResult(model, False)
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.graph is not graph:
                continue
            if _is(node, "Erf"):
                match = self._match_erf(node)
            elif _is(node, "Tanh"):
                match = self._match_tanh(node)
            else:
                continue
            if isinstance(match, str):
                logger.debug("No GELU at %r: %s", node.name, match)
                continue
            self._rewrite(graph, node, match)
            count += 1
        if count:
            logger.info("Fused %s GELUs", count)
        return ir.passes.PassResult(model, modified=bool(count))

    # -- matching -------------------------------------------------------------------

    def _near(self, value: ir.Value | None, target: float) -> bool:
        """True if ``value`` is a one-element float constant close to ``target``."""
        array = utils.const_array(value)
        if array is None or array.size != 1 or array.dtype.kind != "f":
            return False
        tol = max(self.atol, 2 * float(np.finfo(array.dtype).eps) * abs(target))
        return abs(float(array.reshape(())) - target) <= tol

    def _const_operand(self, node: ir.Node, target: float) -> tuple[ir.Value, ir.Value] | None:
        """For binary ``node``, return (other operand, constant) if one operand is ~target."""
        a, b = node.inputs[0], node.inputs[1]
        if self._near(b, target) and a is not None:
            return a, b
        if self._near(a, target) and b is not None:
            return b, a
        return None

    def _match_tail(
        self, fx: ir.Node, x: ir.Value
    ) -> tuple[list[ir.Node], ir.Value, list[ir.Value | None]] | str:
        """Match ``0.5 * x * (1 + fx)`` after the Erf/Tanh node ``fx``; return (nodes, output,
        constants), the ``Add`` of 1 first."""
        add = utils.single_consumer(fx.outputs[0])
        one = self._const_operand(add, 1.0) if _is(add, "Add") else None
        if one is None or one[0] is not fx.outputs[0]:
            return f"{fx.op_type} is not followed by + 1"
        product = self._match_product(add.outputs[0], x)
        if isinstance(product, str):
            return product
        nodes, output, constants = product
        return [add, *nodes], output, [one[1], *constants]

    def _match_product(
        self, one_plus: ir.Value, x: ir.Value
    ) -> tuple[list[ir.Node], ir.Value, list[ir.Value | None]] | str:
        """Match ``0.5 * x * one_plus`` in any grouping; return (nodes, output, constants)."""
        m1 = utils.single_consumer(one_plus)
        if not _is(m1, "Mul"):
            return "1 + f(x) is not multiplied"
        operand = _other(m1, one_plus)
        if operand is None:
            return "1 + f(x) is not an operand"
        if operand is x:  # (x * p) * 0.5
            m2 = utils.single_consumer(m1.outputs[0])
            found = self._const_operand(m2, 0.5) if _is(m2, "Mul") else None
            if found is None or found[0] is not m1.outputs[0]:
                return "x * (1 + f(x)) is not multiplied by 0.5"
            return [m1, m2], m2.outputs[0], [found[1]]
        if self._near(operand, 0.5):  # (p * 0.5) * x
            m2 = utils.single_consumer(m1.outputs[0])
            if not _is(m2, "Mul") or _other(m2, m1.outputs[0]) is not x:
                return "0.5 * (1 + f(x)) is not multiplied by x"
            return [m1, m2], m2.outputs[0], [operand]
        half = operand.producer()  # (x * 0.5) * p
        if not _is(half, "Mul") or utils.single_consumer(operand) is not m1:
            return "1 + f(x) is not multiplied by x, 0.5 or x * 0.5"
        found = self._const_operand(half, 0.5)
        if found is None or found[0] is not x:
            return "the other factor is not x * 0.5"
        return [half, m1], m1.outputs[0], [found[1]]

    def _match_erf(self, erf: ir.Node) -> _Match | str:
        u = erf.inputs[0]
        scaled = u.producer() if u is not None else None
        if scaled is None or utils.single_consumer(u) is not erf:
            return "Erf input is not a private Div/Mul"
        if _is(scaled, "Div") and self._near(scaled.inputs[1], _SQRT_2):
            x, divisor = scaled.inputs[0], scaled.inputs[1]
        elif _is(scaled, "Mul") and (found := self._const_operand(scaled, 1 / _SQRT_2)):
            x, divisor = found
        else:
            return "Erf input is not x / sqrt(2)"
        if x is None:
            return "x is missing"
        tail = self._match_tail(erf, x)
        if isinstance(tail, str):
            return tail
        nodes, output, constants = tail
        return _Match(
            x=x,
            nodes=[scaled, erf, *nodes],
            output=output,
            approximate="none",
            constants=[divisor, *constants],
        )

    def _match_cube(
        self, cube: ir.Value, x: ir.Value, reader: ir.Node
    ) -> tuple[list[ir.Node], list[ir.Value | None]] | None:
        """Match ``cube = x^3``, read only by ``reader``, as ``Pow(x, 3)`` or ``x * (x * x)``."""
        node = cube.producer()
        if node is None or utils.single_consumer(cube) is not reader:
            return None
        if _is(node, "Pow") and node.inputs[0] is x and utils.scalar(node.inputs[1]) == 3.0:
            return [node], [node.inputs[1]]
        if _is(node, "Mul"):
            square = _other(node, x)
            sq_node = square.producer() if square is not None else None
            if (
                _is(sq_node, "Mul")
                and sq_node.inputs[0] is x
                and sq_node.inputs[1] is x
                and utils.single_consumer(square) is node
            ):
                return [sq_node, node], []
        return None

    def _match_tanh(self, tanh: ir.Node) -> _Match | str:
        v = tanh.inputs[0]
        k_node = v.producer() if v is not None else None
        if not _is(k_node, "Mul") or utils.single_consumer(v) is not tanh:
            return "Tanh input is not a private Mul"
        found = self._const_operand(k_node, _SQRT_2_OVER_PI)
        if found is None:
            return "Tanh input is not sqrt(2/pi) * (...)"
        inner, k_const = found
        s_node = inner.producer()
        if not _is(s_node, "Add") or utils.single_consumer(inner) is not k_node:
            return "sqrt(2/pi) does not multiply a private Add"
        for x, w in ((s_node.inputs[0], s_node.inputs[1]), (s_node.inputs[1], s_node.inputs[0])):
            if x is None or w is None:
                continue
            w_node = w.producer()
            if not _is(w_node, "Mul") or utils.single_consumer(w) is not s_node:
                continue
            found = self._const_operand(w_node, _TANH_COEFF)
            if found is None:
                continue
            cube = self._match_cube(found[0], x, w_node)
            if cube is None:
                continue
            cube_nodes, cube_consts = cube
            tail = self._match_tail(tanh, x)
            if isinstance(tail, str):
                return tail
            nodes, output, constants = tail
            return _Match(
                x=x,
                nodes=[*cube_nodes, w_node, s_node, k_node, tanh, *nodes],
                output=output,
                approximate="tanh",
                constants=[*cube_consts, found[1], k_const, *constants],
            )
        return "inner term is not x + 0.044715 * x^3"

    # -- rewriting ------------------------------------------------------------------

    def _rewrite(self, graph: ir.Graph, anchor: ir.Node, match: _Match) -> None:
        last = match.nodes[-1]
        scope = anchor.name.rpartition("/")[0] if anchor.name and "/" in anchor.name else None
        base = f"{scope}/Gelu" if scope else f"{match.output.name or 'gelu'}_Gelu"
        gelu = ir.node(
            "Gelu",
            [match.x],
            attributes={"approximate": match.approximate},
            name=utils.unique_name(graph, base),
        )
        utils.tag(gelu, type(self).__name__, source=last)
        # The last node is the only one reading x after every other matched node,
        # so inserting after it keeps the graph topologically sorted.
        ir.convenience.replace_nodes_and_values(
            graph, last, match.nodes, [gelu], [match.output], [gelu.outputs[0]]
        )
        utils.drop_if_dead(match.constants)
