"""Fuse decomposed layer normalisation into ``LayerNormalization`` (opset >= 17).

Recognises, in the main graph, the decomposition that legacy exporters emit for
``torch.nn.LayerNorm`` over the last axis (e.g. torch.onnx's TorchScript exporter
below opset 17)::

    mu = ReduceMean(x, axes=[-1])              # keepdims=1; axes attribute (< 18) or input
    d  = Sub(x, mu)
    v  = ReduceMean(Pow(d, 2) | Mul(d, d), axes=[-1])
    s  = Sqrt(Add(v, eps))                     # Add operands in either order
    n  = Div(d, s) | Mul(d, Reciprocal(s))     # Mul operands in either order
    y  = Add(Mul(n, gamma), beta)              # optional tail; constants, either order

and rewrites it as ``y = LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)``,
which is the same function: ``(x - E[x]) / sqrt(Var[x] + eps) * gamma + beta`` with
the biased variance over the last axis (Ba et al., "Layer Normalization", 2016).
The reduction axis may be ``-1`` or the last non-negative index when the rank of
``x`` is known.  Without the ``Mul``/``Add`` tail (or with a non-constant one,
which is then left in place) the scale is ones and the bias zeros, which needs the
size ``C`` of the last axis from ``x``'s shape or from ``gamma``/``beta``.
``gamma`` and ``beta`` may be scalars or carry leading 1-dims; they are stored as
``[C]`` vectors (the original initializer is reused when it already is one).

The fused node keeps the name of the pattern's output value (graph outputs keep
working) and the metadata of the pattern's last node, plus
``onnxq.pass = "FuseLayerNormPass"``.  Below opset 17 the pass does nothing.
"""

from __future__ import annotations

__all__ = ["FuseLayerNormPass"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes import _ir_utils as utils

logger = logging.getLogger(__name__)

_MIN_OPSET = 17
_MODULE_KEY = "onnxq.module"


@dataclasses.dataclass
class _Match:
    x: ir.Value
    nodes: list[ir.Node]
    output: ir.Value
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    gamma_value: ir.Value | None
    beta_value: ir.Value | None
    size: int | None
    constants: list[ir.Value | None]


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _reduces_last_axis(node: ir.Node, x: ir.Value) -> bool:
    """True if ``node`` is ``ReduceMean`` over exactly the last axis with keepdims=1.

    ``x`` is the pattern's input; every reduced tensor in the pattern has its rank.
    """
    if not _is(node, "ReduceMean") or node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = node.attributes.get_ints("axes")
    if axes is None:
        if len(node.inputs) < 2:
            return False
        array = utils.const_array(node.inputs[1])
        if array is None:
            return False
        axes = array.reshape(-1).tolist()
    if len(axes) != 1:
        return False
    axis = int(axes[0])
    if axis == -1:
        return True
    rank = x.shape.rank() if x.shape is not None else None
    return rank is not None and axis == rank - 1


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of binary ``node`` that is not ``value`` (None if neither)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value:
        return b
    if b is value:
        return a
    return None


def _as_vector(array: np.ndarray, x: ir.Value, size: int | None) -> np.ndarray | None:
    """``array`` as a ``[C]`` vector if broadcasting it over ``x`` only touches the last axis."""
    if array.dtype.kind != "f":
        return None
    if array.ndim > 1:
        rank = x.shape.rank() if x.shape is not None else None
        if rank is None or array.ndim > rank or any(d != 1 for d in array.shape[:-1]):
            return None
    flat = array.reshape(-1)
    if flat.size == 1:
        return None if size is None else np.full(size, flat[0], dtype=array.dtype)
    if size is not None and flat.size != size:
        return None
    return flat


def _vector_operand(
    node: ir.Node | None, op_type: str, value: ir.Value, x: ir.Value, size: int | None
) -> tuple[np.ndarray, ir.Value] | None:
    """``(vector, constant)`` if ``node`` is ``op_type(value, constant)`` (either order) with a
    constant that broadcasts over ``x``'s last axis only (see :func:`_as_vector`), else None."""
    if not _is(node, op_type):
        return None
    candidate = _other(node, value)
    array = utils.const_array(candidate)
    vector = None if array is None else _as_vector(array, x, size)
    return None if vector is None else (vector, candidate)


def _mean_eps_sqrt(
    square: ir.Node, x: ir.Value, constants: list[ir.Value | None]
) -> tuple[list[ir.Node], float] | str:
    """Match ``Sqrt(Add(ReduceMean(square, last axis), eps))`` after ``square``.

    Returns the three nodes (ReduceMean, Add, Sqrt) and ``eps`` and appends the
    pattern's constants to ``constants``; a string is the rejection reason.
    """
    mean = utils.single_consumer(square.outputs[0])
    if not _is(mean, "ReduceMean") or not _reduces_last_axis(mean, x):
        return "square is not averaged over the last axis"
    constants.extend(mean.inputs[1:])
    add_eps = utils.single_consumer(mean.outputs[0])
    if not _is(add_eps, "Add"):
        return "mean square is not followed by Add(eps)"
    eps_value = _other(add_eps, mean.outputs[0])
    epsilon = utils.scalar(eps_value)
    if epsilon is None or epsilon < 0:
        return "epsilon is not a non-negative constant scalar"
    constants.append(eps_value)
    sqrt = utils.single_consumer(add_eps.outputs[0])
    if not _is(sqrt, "Sqrt"):
        return "no Sqrt after the epsilon"
    return [mean, add_eps, sqrt], epsilon


def _last_dim(x: ir.Value) -> int | None:
    if x.shape is None or x.shape.rank() == 0:
        return None
    dim = x.shape[-1]
    return dim if isinstance(dim, int) else None


def _match(mean: ir.Node) -> _Match | str:
    """Match the pattern rooted at the first ``ReduceMean``; a string is the rejection reason."""
    x = mean.inputs[0]
    if x is None:
        return "ReduceMean has no input"
    if not _reduces_last_axis(mean, x):
        return "first ReduceMean is not over the last axis with keepdims"
    constants: list[ir.Value | None] = list(mean.inputs[1:])
    sub = utils.single_consumer(mean.outputs[0])
    if not _is(sub, "Sub") or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return "mean is not subtracted from x"
    d = sub.outputs[0]
    if d.is_graph_output():
        return "centred value is a graph output"
    consumers = d.consumers()
    if len(consumers) != 2:
        return "centred value does not have exactly two readers"

    square = norm = None
    for node in consumers:
        if _is(node, "Pow") and node.inputs[0] is d and utils.scalar(node.inputs[1]) == 2.0:
            square = node
            constants.append(node.inputs[1])
        elif _is(node, "Mul") and node.inputs[0] is d and node.inputs[1] is d:
            square = node
        else:
            norm = node
    if square is None or norm is None:
        return "no square of the centred value"

    found = _mean_eps_sqrt(square, x, constants)
    if isinstance(found, str):
        return found
    tail, epsilon = found
    sqrt = tail[-1]
    nodes = [mean, sub, square, *tail]
    if _is(norm, "Div"):
        if norm.inputs[0] is not d or norm.inputs[1] is not sqrt.outputs[0]:
            return "Div is not (x - mean) / std"
        std_reader = norm
    elif _is(norm, "Mul"):
        recip = utils.single_consumer(sqrt.outputs[0])
        if not _is(recip, "Reciprocal") or _other(norm, d) is not recip.outputs[0]:
            return "Mul is not (x - mean) * Reciprocal(std)"
        if utils.single_consumer(recip.outputs[0]) is not norm:
            return "Reciprocal has other readers"
        nodes.append(recip)
        std_reader = recip
    else:
        return "centred value is not normalised by Div or Mul(Reciprocal)"
    if utils.single_consumer(sqrt.outputs[0]) is not std_reader:
        return "Sqrt has other readers"
    nodes.append(norm)

    # Optional affine tail: Mul by a constant gamma, then Add of a constant beta.
    size = _last_dim(x)
    output = norm.outputs[0]
    gamma = beta = None
    gamma_value = beta_value = None
    mul = utils.single_consumer(output)
    found_gamma = _vector_operand(mul, "Mul", output, x, size)
    if found_gamma is not None:
        gamma, gamma_value = found_gamma
        size = gamma.size
        constants.append(gamma_value)
        nodes.append(mul)
        output = mul.outputs[0]
        add = utils.single_consumer(output)
        found_beta = _vector_operand(add, "Add", output, x, size)
        if found_beta is not None:
            beta, beta_value = found_beta
            constants.append(beta_value)
            nodes.append(add)
            output = add.outputs[0]
    if size is None:
        return "size of the normalised axis is unknown"
    return _Match(
        x=x,
        nodes=nodes,
        output=output,
        epsilon=epsilon,
        gamma=gamma,
        beta=beta,
        gamma_value=gamma_value,
        beta_value=beta_value,
        size=size,
        constants=constants,
    )


def _vector_input(
    graph: ir.Graph, value: ir.Value | None, vector: np.ndarray, name: str
) -> ir.Value:
    """Reuse ``value`` if it already is the ``[C]`` initializer ``vector``, else add one."""
    if (
        value is not None
        and value.is_initializer()
        and value.shape is not None
        and value.shape.rank() == 1
        and value.const_value is not None
        and value.const_value.dtype == ir.DataType.from_numpy(vector.dtype)
    ):
        return value
    return utils.make_initializer(graph, name, vector)


def _dtype(x: ir.Value, match: _Match) -> np.dtype:
    if x.type is not None and x.type.dtype.is_floating_point():
        return x.type.dtype.numpy()
    for array in (match.gamma, match.beta):
        if array is not None:
            return array.dtype
    return np.dtype(np.float32)


class FuseLayerNormPass(ir.passes.InPlacePass):
    """Replace decomposed last-axis layer norms by ``LayerNormalization`` nodes.

    Does nothing (``modified`` False) when the model's default opset is below 17.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if utils.opset(model) < _MIN_OPSET:
            logger.debug("FuseLayerNormPass skipped: opset %s < %s", utils.opset(model), _MIN_OPSET)
            return ir.passes.PassResult(model, False)
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.graph is not graph or not _is(node, "ReduceMean"):
                continue
            match = _match(node)
            if isinstance(match, str):
                logger.debug("No layer norm at %r: %s", node.name, match)
                continue
            self._rewrite(graph, match)
            count += 1
        if count:
            logger.info("Fused %s layer norms", count)
        return ir.passes.PassResult(model, modified=bool(count))

    def _rewrite(self, graph: ir.Graph, match: _Match) -> None:
        dtype = _dtype(match.x, match)
        size = match.size
        assert size is not None
        base = match.output.name or "layer_norm"
        gamma = match.gamma if match.gamma is not None else np.ones(size, dtype)
        beta = match.beta if match.beta is not None else np.zeros(size, dtype)
        scale = _vector_input(graph, match.gamma_value, gamma.astype(dtype), f"{base}_scale")
        bias = _vector_input(graph, match.beta_value, beta.astype(dtype), f"{base}_bias")

        first, last = match.nodes[0], match.nodes[-1]
        scope = first.name.rpartition("/")[0] if first.name and "/" in first.name else base
        fused = ir.node(
            "LayerNormalization",
            [match.x, scale, bias],
            attributes={"axis": -1, "epsilon": match.epsilon},
            name=utils.unique_name(graph, f"{scope}/LayerNormalization"),
        )
        utils.tag(fused, type(self).__name__, source=last)
        if _MODULE_KEY not in fused.metadata_props:
            for node in match.nodes:
                if _MODULE_KEY in node.metadata_props:
                    fused.metadata_props[_MODULE_KEY] = node.metadata_props[_MODULE_KEY]
                    break
        ir.convenience.replace_nodes_and_values(
            graph, last, match.nodes, [fused], [match.output], [fused.outputs[0]]
        )
        utils.drop_if_dead(match.constants)
