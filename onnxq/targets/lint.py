"""Lint a QDQ ONNX graph against the rules of one deployment target.

The checks mirror what the runtimes' parsers and fusers accept (see
``shared/design/deploy-rules.md``, sections A, B1, B3, B4, D2 and F): the opset
range, QOperator / contrib ops TensorRT cannot parse, Q/DQ element types, zero
points, scale values and shapes, per-tensor activations, and Q/DQ placement
around LayerNorm / Softmax / GELU, the attention-mask Add and GEMM outputs.

The linter works on the ``onnx_ir`` use-def graph.  It never loads weights: the
shapes and types of quantized tensors come from the values, and only scale and
zero-point tensors (small) are read.

Example:
    >>> violations = lint(model, "tensorrt")  # doctest: +SKIP
    >>> print(format_violations(violations))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.targets.profiles import TargetProfile, get_target

__all__ = ["Violation", "format_violations", "linear_weight_coverage", "lint"]

_MODULE_KEY = "onnxq.module"
_Q = "QuantizeLinear"
_DQ = "DequantizeLinear"
_GEMMS = frozenset({"MatMul", "Gemm"})
_QUANTIZED_CONSUMERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
# Ops that only move or re-type data: a constant stays a constant through them and a
# DQ output stays "the same tensor" through them.
_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
_STATIC_PASS = _DATA_MOVEMENT | {"Cast", _Q, _DQ}
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_FOUR_BIT = frozenset({ir.DataType.INT4, ir.DataType.UINT4})
_QUANT_WEIGHT_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
)
_MAX_WALK = 16


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken deployment rule.

    Attributes:
        rule: Short rule id, e.g. ``"zero-point-nonzero"``.
        node: Name of the offending node (``""`` for graph-level rules).
        message: One human-readable line; names the PyTorch module path when known.
        module: PyTorch module path from the ``onnxq.module`` metadata, if any.
        severity: ``"error"`` (the runtime rejects or mis-reads the graph) or
            ``"warning"`` (the graph works but is slow or not fused).
    """

    rule: str
    node: str
    message: str
    module: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        """Render as ``"rule: node (module): message"``."""
        where = self.node or "<graph>"
        if self.module:
            where = f"{where} ({self.module})"
        return f"{self.rule}: {where}: {self.message}"


def format_violations(violations: Sequence[Violation]) -> str:
    """Format violations as a multi-line report, one violation per line.

    Args:
        violations: The result of :func:`lint`.

    Returns:
        ``"no lint violations"`` when empty, otherwise a count line followed by one
        indented line per violation (warnings are tagged ``[warning]``).
    """
    if not violations:
        return "no lint violations"
    errors = sum(1 for v in violations if v.severity != "warning")
    warnings = len(violations) - errors
    lines = [f"{len(violations)} lint violation(s): {errors} error(s), {warnings} warning(s)"]
    for v in violations:
        tag = " [warning]" if v.severity == "warning" else ""
        lines.append(f"  {v}{tag}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- model access


def _to_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    raise TypeError(f"expected onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _node_name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a ``Constant`` node produces, or None when it is not a plain tensor."""
    attrs = node.attributes
    tensor = attrs.get_tensor("value", None)
    if tensor is not None:
        return tensor
    if "value_float" in attrs:
        return ir.tensor(np.array(attrs.get_float("value_float"), dtype=np.float32))
    if "value_floats" in attrs:
        return ir.tensor(np.array(attrs.get_floats("value_floats"), dtype=np.float32))
    if "value_int" in attrs:
        return ir.tensor(np.array(attrs.get_int("value_int"), dtype=np.int64))
    if "value_ints" in attrs:
        return ir.tensor(np.array(attrs.get_ints("value_ints"), dtype=np.int64))
    return None


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value`` (initializer or Constant node), else None."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in _STANDARD_DOMAINS
    ):
        return _constant_node_tensor(producer)
    return None


def _is_static(value: ir.Value | None) -> bool:
    """True when ``value`` is computed from constants only (a weight, not an activation)."""
    for _ in range(_MAX_WALK):
        if value is None or value.is_graph_input():
            return False
        if _const_tensor(value) is not None:
            return True
        producer = value.producer()
        if producer is None or producer.op_type not in _STATIC_PASS:
            return False
        value = _input(producer, 0)
    return False


def _shape_of(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """Static shape of ``value`` (None dims when symbolic), or None when unknown."""
    if value is None:
        return None
    tensor = _const_tensor(value)
    shape = tensor.shape if tensor is not None else value.shape
    if shape is None:
        producer = value.producer()
        if producer is not None and producer.op_type in (_Q, _DQ):
            return _shape_of(_input(producer, 0))
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _read_array(tensor: ir.TensorProtocol, base_dir: str) -> np.ndarray:
    """Read a (small) tensor's values as float64."""
    if isinstance(tensor, ir.ExternalTensor) and base_dir and not str(tensor.base_dir):
        tensor.base_dir = base_dir
    try:
        array = np.asarray(tensor.numpy())
    except OSError as exc:
        raise OnnxqError(f"cannot read tensor {tensor.name!r}: {exc}") from None
    return array.astype(np.float64)


def _module_of(node: ir.Node) -> str:
    """PyTorch module path of ``node``, or of the GEMM/neighbour a Q/DQ belongs to."""
    own = node.metadata_props.get(_MODULE_KEY, "")
    if own or node.op_type not in (_Q, _DQ):
        return own
    # Downstream: the quantized GEMM this Q/DQ feeds.
    frontier = [node]
    seen: set[ir.Node] = set()
    for _ in range(4):
        nxt: list[ir.Node] = []
        for current in frontier:
            for out in current.outputs:
                for consumer in out.consumers():
                    if consumer in seen:
                        continue
                    seen.add(consumer)
                    module = consumer.metadata_props.get(_MODULE_KEY, "")
                    if consumer.op_type in _QUANTIZED_CONSUMERS and module:
                        return module
                    if consumer.op_type in _STATIC_PASS:
                        nxt.append(consumer)
        frontier = nxt
    # Otherwise any direct neighbour that knows its module.
    neighbours: list[ir.Node] = [c for out in node.outputs for c in out.consumers()]
    x = _input(node, 0)
    if x is not None and x.producer() is not None:
        neighbours.append(x.producer())
    for other in neighbours:
        module = other.metadata_props.get(_MODULE_KEY, "")
        if module:
            return module
    return ""


# --------------------------------------------------------------------------- Q/DQ facts


def _type_name(dtype: ir.DataType) -> str:
    return dtype.name.lower()


def _value_dtype(value: ir.Value | None) -> ir.DataType | None:
    if value is None:
        return None
    tensor = _const_tensor(value)
    if tensor is not None:
        return tensor.dtype
    return value.dtype


def _q_declared_types(node: ir.Node) -> tuple[ir.DataType | None, ir.DataType | None]:
    """(zero-point dtype, output_dtype attribute) of a QuantizeLinear."""
    zp_type = _value_dtype(_input(node, 2))
    out_attr = node.attributes.get_int("output_dtype", 0)
    return zp_type, (ir.DataType(out_attr) if out_attr else None)


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """The integer/fp8 type a Q produces or a DQ consumes (None when unknown)."""
    if node.op_type == _Q:
        zp_type, out_type = _q_declared_types(node)
        return zp_type or out_type or ir.DataType.UINT8
    x = _input(node, 0)
    x_type = _value_dtype(x)
    if x_type is not None and x_type != ir.DataType.UNDEFINED:
        return x_type
    producer = x.producer() if x is not None else None
    if producer is not None and producer.op_type == _Q:
        return _quantized_type(producer)
    return _value_dtype(_input(node, 2))


def _is_activation(node: ir.Node) -> bool:
    """Whether a Q/DQ quantizes an activation (its data input is not constant)."""
    return not _is_static(_input(node, 0))


@dataclasses.dataclass(frozen=True)
class _Granularity:
    kind: str  # "tensor", "axis", "block", "unknown" or "bad"
    reason: str = ""
    axis: int = 0
    block_size: int = 0


def _granularity(node: ir.Node) -> _Granularity:
    """Classify the scale of a Q/DQ as per-tensor, per-axis or blocked."""
    scale_shape = _shape_of(_input(node, 1))
    if scale_shape is None:
        return _Granularity("unknown")
    x_shape = _shape_of(_input(node, 0))
    rank = len(x_shape) if x_shape is not None else None
    block_size = node.attributes.get_int("block_size", 0)
    axis = node.attributes.get_int("axis", 1)
    scale_size = math.prod(d if d is not None else 2 for d in scale_shape)
    if block_size <= 0 and (
        len(scale_shape) == 0 or (len(scale_shape) == 1 and scale_size == 1)
    ):
        return _Granularity("tensor")  # `axis` is ignored for per-tensor scales
    if rank is not None and rank > 0:
        if not -rank <= axis < rank:
            return _Granularity("bad", f"axis {axis} is out of range for rank {rank}")
        axis %= rank
    if block_size <= 0:
        if len(scale_shape) == 1:
            dim = x_shape[axis] if x_shape is not None and rank and rank > axis else None
            if dim is not None and scale_shape[0] is not None and dim != scale_shape[0]:
                return _Granularity(
                    "bad", f"per-axis scale has {scale_shape[0]} entries but dim[{axis}] is {dim}"
                )
            return _Granularity("axis", axis=axis)
        return _Granularity(
            "bad", f"scale shape {list(scale_shape)} is neither scalar, 1-D, nor blocked"
        )
    if rank is None:
        return _Granularity("block", axis=axis, block_size=block_size)
    if len(scale_shape) != rank:
        return _Granularity(
            "bad", f"blocked scale has rank {len(scale_shape)} but the input has rank {rank}"
        )
    for i, (s_dim, x_dim) in enumerate(zip(scale_shape, x_shape, strict=True)):
        if s_dim is None or x_dim is None:
            continue
        expected = -(-x_dim // block_size) if i == axis else x_dim
        if s_dim != expected:
            return _Granularity(
                "bad",
                f"blocked scale shape {list(scale_shape)} does not match input {list(x_shape)} "
                f"with block_size {block_size} on axis {axis}",
            )
    return _Granularity("block", axis=axis, block_size=block_size)


# --------------------------------------------------------------------------- rule context


@dataclasses.dataclass
class _Ctx:
    profile: TargetProfile
    base_dir: str
    _gran: dict[ir.Node, _Granularity] = dataclasses.field(default_factory=dict)

    def granularity(self, node: ir.Node) -> _Granularity:
        if node not in self._gran:
            self._gran[node] = _granularity(node)
        return self._gran[node]

    def violation(
        self,
        rule: str,
        node: ir.Node,
        text: str,
        module_node: ir.Node | None = None,
        severity: str = "error",
    ) -> Violation:
        module = _module_of(module_node or node)
        if not module and module_node is not None:
            module = _module_of(node)
        message = f"{text} (module {module})" if module else text
        return Violation(rule, _node_name(node), message, module, severity)


_Rule = Callable[[ir.Node, _Ctx], Iterator[Violation]]


def _check_opset(model: ir.Model, profile: TargetProfile) -> Iterator[Violation]:
    """Rule ``opset``: the ai.onnx opset lies in the target's range."""
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        yield Violation("opset", "", "the model imports no ai.onnx opset")
    elif not profile.min_opset <= version <= profile.max_opset:
        yield Violation(
            "opset",
            "",
            f"ai.onnx opset {version} is outside [{profile.min_opset}, {profile.max_opset}] "
            f"parsed by {profile.name}",
        )


def _check_forbidden(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rules ``forbidden-op`` and ``custom-domain``: ops the runtime cannot parse."""
    profile = ctx.profile
    if node.op_type in profile.forbid_ops:
        yield ctx.violation(
            "forbidden-op",
            node,
            f"{node.op_type} (QOperator format) is not parsed by {profile.name}; emit QDQ instead",
        )
    elif node.domain not in _STANDARD_DOMAINS and not profile.allow_custom_domains:
        yield ctx.violation(
            "custom-domain",
            node,
            f"{node.domain}.{node.op_type} is outside the ai.onnx domain and not parsed by "
            f"{profile.name}",
        )


def _check_qdq_type(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rules ``qdq-type``, ``qdq-type-implicit`` and ``qdq-type-mismatch``."""
    if node.op_type not in (_Q, _DQ):
        return
    profile = ctx.profile
    if node.op_type == _Q:
        zp_type, out_type = _q_declared_types(node)
        if zp_type is not None and out_type is not None and zp_type != out_type:
            yield ctx.violation(
                "qdq-type-mismatch",
                node,
                f"zero point is {_type_name(zp_type)} but output_dtype is {_type_name(out_type)}",
            )
            return
        if zp_type is None and out_type is None and profile.require_explicit_qdq_type:
            yield ctx.violation(
                "qdq-type-implicit",
                node,
                "QuantizeLinear has neither a zero point nor output_dtype (ONNX means uint8, "
                f"{profile.name} assumes int8); add an int8 zero point of 0",
            )
            return
        qtype = zp_type or out_type or ir.DataType.UINT8
    else:
        x = _input(node, 0)
        own_type = _value_dtype(x)
        if own_type == ir.DataType.UNDEFINED:
            own_type = None
        zp_type = _value_dtype(_input(node, 2))
        x_type = own_type
        producer = x.producer() if x is not None else None
        if x_type is None and producer is not None and producer.op_type == _Q:
            declared = _q_declared_types(producer)
            x_type = declared[0] or declared[1]
        if x_type is not None and zp_type is not None and x_type != zp_type:
            yield ctx.violation(
                "qdq-type-mismatch",
                node,
                f"input is {_type_name(x_type)} but zero point is {_type_name(zp_type)}",
            )
            return
        # A DQ that only inherits its type from the Q before it is judged on that Q.
        qtype = own_type or zp_type
    if qtype is None or qtype == ir.DataType.UNDEFINED:
        return
    if qtype in _FOUR_BIT and ctx.granularity(node).kind == "block":
        return  # blocked 4-bit tensors are judged by the int4-block rule
    if _type_name(qtype) not in profile.allowed_qdq_types:
        allowed = ", ".join(profile.allowed_qdq_types)
        yield ctx.violation(
            "qdq-type",
            node,
            f"{node.op_type} uses {_type_name(qtype)}; {profile.name} accepts {allowed}",
        )


def _check_zero_point(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rules ``zero-point-nonzero`` / ``zero-point-not-constant`` for symmetric targets."""
    if node.op_type not in (_Q, _DQ) or not ctx.profile.activation_symmetric:
        return
    zp = _input(node, 2)
    if zp is None:
        return
    tensor = _const_tensor(zp)
    if tensor is None:
        yield ctx.violation(
            "zero-point-not-constant", node, f"zero point {zp.name!r} is not a constant"
        )
        return
    values = _read_array(tensor, ctx.base_dir)
    nonzero = int(np.count_nonzero(values))
    if nonzero:
        yield ctx.violation(
            "zero-point-nonzero",
            node,
            f"{nonzero} of {values.size} zero point value(s) are non-zero; "
            f"{ctx.profile.name} is symmetric-only",
        )


def _check_scale(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rules ``scale-not-constant`` and ``scale-not-positive``."""
    if node.op_type not in (_Q, _DQ):
        return
    scale = _input(node, 1)
    tensor = _const_tensor(scale)
    if tensor is None:
        name = scale.name if scale is not None else ""
        yield ctx.violation(
            "scale-not-constant", node, f"scale {name!r} is not a constant initializer"
        )
        return
    values = _read_array(tensor, ctx.base_dir)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        first = values[bad].flat[0]
        yield ctx.violation(
            "scale-not-positive",
            node,
            f"{int(bad.sum())} of {values.size} scale value(s) are not finite and > 0 "
            f"(e.g. {first:g})",
        )


def _check_scale_shape(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rules ``scale-shape`` and ``int4-block``."""
    if node.op_type not in (_Q, _DQ):
        return
    gran = ctx.granularity(node)
    if gran.kind == "bad":
        yield ctx.violation("scale-shape", node, gran.reason)
        return
    if gran.kind != "block":
        return
    profile = ctx.profile
    qtype = _quantized_type(node)
    reasons: list[str] = []
    if qtype not in _FOUR_BIT:
        type_name = _type_name(qtype) if qtype is not None else "an unknown type"
        reasons.append(f"blocked quantization is only supported for int4 weights, not {type_name}")
    else:
        if not profile.allow_int4_weights or _type_name(qtype) not in profile.allowed_qdq_types:
            reasons.append(f"{profile.name} does not accept blocked {_type_name(qtype)} weights")
        elif gran.block_size not in profile.int4_block_sizes:
            sizes = ", ".join(map(str, profile.int4_block_sizes))
            reasons.append(f"block_size {gran.block_size} is not one of {sizes}")
    if _is_activation(node):
        reasons.append("blocked quantization of an activation")
    x_shape = _shape_of(_input(node, 0))
    if x_shape is not None:
        rank = len(x_shape)
        if rank and gran.axis not in (rank - 2, rank - 1):
            reasons.append(f"block axis {gran.axis} is not one of the last two dims")
        if all(d is not None for d in x_shape) and math.prod(x_shape) % 2:  # type: ignore[arg-type]
            reasons.append("odd element count cannot be packed two per byte")
    if reasons:
        yield ctx.violation("int4-block", node, "; ".join(reasons))


def _check_activation_per_tensor(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rule ``activation-per-channel``: activation Q/DQ must use a scalar scale."""
    if node.op_type not in (_Q, _DQ) or not _is_activation(node):
        return
    gran = ctx.granularity(node)
    if gran.kind in ("axis", "block"):
        shape = _shape_of(_input(node, 1))
        yield ctx.violation(
            "activation-per-channel",
            node,
            f"activation {node.op_type} has a {gran.kind} scale of shape "
            f"{list(shape or ())}; activations must be quantized per tensor",
        )


def _producer_through(value: ir.Value | None, skip: frozenset[str]) -> ir.Node | None:
    """Producer of ``value``, looking through ops in ``skip``."""
    for _ in range(_MAX_WALK):
        if value is None:
            return None
        producer = value.producer()
        if producer is None or producer.op_type not in skip:
            return producer
        value = _input(producer, 0)
    return None


def _consumers_through(value: ir.Value, skip: frozenset[str]) -> list[ir.Node]:
    """Consumers of ``value``, looking through ops in ``skip``."""
    found: list[ir.Node] = []
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        for consumer in current.consumers():
            if consumer in seen:
                continue
            seen.add(consumer)
            if consumer.op_type in skip:
                stack.extend(consumer.outputs)
            else:
                found.append(consumer)
    return found


_CAST_LIKE = frozenset({"Cast", "Identity"})


def _check_qdq_around(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rule ``qdq-around-op``: no Q/DQ around ops the target keeps in float.

    Flagged: a DequantizeLinear feeding such an op, and a QuantizeLinear on such an
    op's output unless its DQs feed only MatMul/Gemm/Conv (that Q/DQ belongs to the
    GEMM input, e.g. LayerNorm -> Q -> DQ -> MatMul).  A QuantizeLinear on a Softmax
    output is always allowed (quantized P·V MatMul, as ModelOpt emits for TensorRT).
    """
    avoid = ctx.profile.no_qdq_around
    if not avoid:
        return
    if node.op_type == _Q:
        producer = _producer_through(_input(node, 0), _CAST_LIKE)
        if (
            producer is not None
            and producer.op_type in avoid
            and producer.op_type != "Softmax"
            and not _q_feeds_only_gemms(node)
        ):
            yield ctx.violation(
                "qdq-around-op",
                node,
                f"QuantizeLinear on the output of {producer.op_type} {_node_name(producer)!r}; "
                f"keep {producer.op_type} in float on {ctx.profile.name}",
                module_node=producer,
            )
    elif node.op_type == _DQ:
        for consumer in _consumers_through(node.outputs[0], _CAST_LIKE):
            if consumer.op_type in avoid:
                yield ctx.violation(
                    "qdq-around-op",
                    node,
                    f"DequantizeLinear feeds {consumer.op_type} {_node_name(consumer)!r}; "
                    f"keep {consumer.op_type} in float on {ctx.profile.name}",
                    module_node=consumer,
                )


_MASK_PATH = frozenset({"Where", "Cast", _Q, _DQ})


def _is_mask_add(node: ir.Node) -> bool:
    """An Add whose output reaches a Softmax directly or through Where/Cast (and Q/DQ)."""
    if node.op_type != "Add":
        return False
    return any(c.op_type == "Softmax" for c in _consumers_through(node.outputs[0], _MASK_PATH))


def _check_mask_add(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rule ``qdq-on-mask-add``: the attention-mask Add stays in float.

    Applies to targets that keep Softmax out of Q/DQ (``"Softmax"`` in
    ``no_qdq_around``); the mask Add is part of the Softmax input.
    """
    if "Softmax" not in ctx.profile.no_qdq_around:
        return
    if node.op_type == _Q:
        producer = _producer_through(_input(node, 0), _CAST_LIKE)
        # A Q/DQ between the mask Add and a float-only op is reported once, by
        # qdq-around-op on its DQ.
        dq_feeds_avoided = any(
            c.op_type in ctx.profile.no_qdq_around
            for dq in node.outputs[0].consumers()
            if dq.op_type == _DQ
            for c in _consumers_through(dq.outputs[0], _CAST_LIKE)
        )
        if producer is not None and _is_mask_add(producer) and not dq_feeds_avoided:
            yield ctx.violation(
                "qdq-on-mask-add",
                node,
                f"QuantizeLinear on the attention-mask Add {_node_name(producer)!r}",
                module_node=producer,
            )
    elif node.op_type == _DQ:
        for consumer in _consumers_through(node.outputs[0], _CAST_LIKE):
            if _is_mask_add(consumer):
                yield ctx.violation(
                    "qdq-on-mask-add",
                    node,
                    f"DequantizeLinear feeds the attention-mask Add {_node_name(consumer)!r}",
                    module_node=consumer,
                )


def _q_feeds_only_gemms(node: ir.Node) -> bool:
    """Whether every use of a Q's output is a DQ feeding MatMul/Gemm/Conv (through reshapes)."""
    out = node.outputs[0]
    if not out.consumers() or out.is_graph_output():
        return False
    for dq in out.consumers():
        if dq.op_type != _DQ or dq.outputs[0].is_graph_output():
            return False
        finals = _consumers_through(dq.outputs[0], _DATA_MOVEMENT)
        if not finals or any(c.op_type not in _QUANTIZED_CONSUMERS for c in finals):
            return False
    return True


def _check_gemm_output_q(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rule ``gemm-output-q`` (warning): a Q on a GEMM output must feed quantized GEMMs."""
    if node.op_type != _Q or ctx.profile.allow_gemm_output_q:
        return
    x = _input(node, 0)
    producer = x.producer() if x is not None else None
    if producer is None or producer.op_type not in _GEMMS:
        return
    if not _q_feeds_only_gemms(node):
        yield ctx.violation(
            "gemm-output-q",
            node,
            f"QuantizeLinear on the output of {producer.op_type} {_node_name(producer)!r} "
            "does not feed quantized GEMMs only; TensorRT cannot fuse it",
            module_node=producer,
            severity="warning",
        )


def _check_simulation(node: ir.Node, ctx: _Ctx) -> Iterator[Violation]:
    """Rule ``simulation-only``: nodes that only simulate a quantizer (e.g. TanQ)."""
    kind = node.metadata_props.get("onnxq.simulation")
    if kind:
        yield ctx.violation(
            "simulation-only",
            node,
            f"{node.op_type} is part of a {kind} quantizer simulation, not an INT8 kernel path "
            f"on {ctx.profile.name}; re-quantize with a uniform 8-bit (or FP16) post-Softmax",
            severity="warning" if ctx.profile.allow_custom_domains else "error",
        )


_NODE_RULES: tuple[_Rule, ...] = (
    _check_simulation,
    _check_forbidden,
    _check_qdq_type,
    _check_zero_point,
    _check_scale,
    _check_scale_shape,
    _check_activation_per_tensor,
    _check_qdq_around,
    _check_mask_add,
    _check_gemm_output_q,
)


def lint(
    model: onnx.ModelProto | ir.Model,
    target: str | TargetProfile,
    *,
    base_dir: str | os.PathLike[str] = "",
) -> list[Violation]:
    """Check a QDQ model against a deployment target's rules.

    Args:
        model: The model, as ``onnx.ModelProto`` or ``onnx_ir.Model``.  Weights may stay
            in external data; only scale and zero-point tensors are read.
        target: A target name from ``TARGETS`` or a :class:`TargetProfile`.
        base_dir: Directory of the model file, to resolve external data of an
            ``onnx.ModelProto`` loaded without it.

    Returns:
        Every violation: graph-level ones first, then per node in graph order.

    Raises:
        OnnxqError: Unknown target name, or an unreadable scale / zero-point tensor.
    """
    profile = get_target(target) if isinstance(target, str) else target
    ir_model = _to_ir(model)
    ctx = _Ctx(profile=profile, base_dir=os.fspath(base_dir))
    violations = list(_check_opset(ir_model, profile))
    for node in ir_model.graph.all_nodes():
        for rule in _NODE_RULES:
            violations.extend(rule(node, ctx))
    return violations


# --------------------------------------------------------------------------- coverage


def _trace_weight(value: ir.Value | None) -> tuple[ir.TensorProtocol, bool] | None:
    """Follow a GEMM weight input back to its constant.

    Returns:
        (constant tensor, whether an integer DequantizeLinear sits on the path), or None
        when the input is not a constant weight.
    """
    quantized = False
    for _ in range(_MAX_WALK):
        if value is None or value.is_graph_input():
            return None
        tensor = _const_tensor(value)
        if tensor is not None:
            return tensor, quantized
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == _DQ:
            if _quantized_type(producer) in _QUANT_WEIGHT_TYPES:
                quantized = True
        elif producer.op_type not in _STATIC_PASS:
            return None
        value = _input(producer, 0)
    return None


def _weight_input(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """(weight, activation) inputs of a MatMul/Gemm; weight is None when not constant."""
    a, b = _input(node, 0), _input(node, 1)
    if node.op_type == "Gemm" or _is_static(b):
        return (b, a) if _is_static(b) else (None, a)
    if _is_static(a):
        return a, b
    return None, a


# MatMuls that apply a fixed rotation (online Hadamard) are not linear layers.
_ROTATION_PASSES = ("OnlineHadamardPass", "QuambaPass")


def _iter_linears(model: ir.Model) -> Iterable[ir.Node]:
    return (
        n
        for n in model.graph.all_nodes()
        if n.op_type in _GEMMS and n.domain in _STANDARD_DOMAINS
        and n.metadata_props.get("onnxq.pass") not in _ROTATION_PASSES
    )


def linear_weight_coverage(model: onnx.ModelProto | ir.Model) -> tuple[int, int]:
    """Count how many linear-layer weight elements are quantized.

    A MatMul/Gemm weight is its constant input (an initializer or Constant, possibly
    behind DequantizeLinear, QuantizeLinear, Transpose, Cast or reshaping ops).  It counts
    as quantized when the path to the GEMM holds a DequantizeLinear of an 8/4-bit integer
    tensor (an int8/int4 initializer, or a Q->DQ pair on a float weight) and the other
    (activation) input is produced by a DequantizeLinear.

    Args:
        model: The model, as ``onnx.ModelProto`` or ``onnx_ir.Model``.

    Returns:
        ``(quantized_elements, total_elements)``; divide for the coverage ratio.
    """
    ir_model = _to_ir(model)
    quantized = total = 0
    for node in _iter_linears(ir_model):
        weight, activation = _weight_input(node)
        traced = _trace_weight(weight)
        if traced is None:
            continue
        tensor, weight_quantized = traced
        count = math.prod(int(d) for d in tensor.shape)
        total += count
        act_producer = activation.producer() if activation is not None else None
        if weight_quantized and act_producer is not None and act_producer.op_type == _DQ:
            quantized += count
    return quantized, total
