"""Quantized KV cache (KIVI / RotateKV style) with real low-bit storage in the graph.

:class:`QuantizeKVCachePass` rewrites a decoder exported by
:func:`onnxq.exporters.decoder.export_decoder` so that its cache tensors are
integer codes.  For every layer ``i`` and kind ``k`` (``key`` / ``value``) the
FP32 pair ``past_key_values.{i}.{k}`` → ``present.{i}.{k} = Concat(past, new)``
becomes:

==========================================  ======================================  =======
name                                        shape                                   type
==========================================  ======================================  =======
``past_key_values.{i}.{k}``                 ``[B, H, P, D · bits / 8]``             uint8
``past_key_values.{i}.{k}_scale``           ``[B, H, P, D / group]``                float16
``past_key_values.{i}.{k}_zero`` (asym.)    ``[B, H, P, D / group]``                float16
``past_key_values.{i}.{k}_sink`` (sinks)    ``[B, H, Ps, D]`` with ``Ps ≤ N``       float16
==========================================  ======================================  =======

and the same names with ``present.`` for the outputs.  **Layout: append.**  The
``present.*`` outputs hold only the rows of the tokens fed in this run (the runtime
appends them along axis 2; :class:`onnxq.runtime.kv.QuantizedKVSession`), so the graph
never copies or re-quantizes the past.  Inside the graph:

* *read*: the past codes are unpacked (``BitShift`` right by ``0, b, 2b, …`` and
  ``BitwiseAnd(2^b − 1)`` on uint8; 8-bit codes are used as they are), cast to float
  and dequantized per token and group, ``x = q · s + z`` (asymmetric, ``z`` the group
  minimum) or ``x = (q − 2^(b−1)) · s`` (symmetric); keys are then rotated back
  (``· Mᵀ``, see below).  Attention reads ``Concat(sink, dequantized past, new)``,
  so the tokens of the current run are exact;
* *write*: the new rows (minus those that go to the sink cache) are rotated
  (keys, ``· M``), split into groups of ``group_size`` channels, quantized per token
  and group with min/max (``ReduceMin``/``ReduceMax`` → ``Round`` → ``Clip``; the scale
  and minimum are rounded to float16 first so the codes match what is stored) and
  packed ``8 / bits`` codes per byte (``Mul`` by ``2^(j·b)`` + ``ReduceSum`` + ``Cast``).

Cache bytes per token and layer: ``2 · H · (D·b/8 + 2·G + 2·G)`` (asymmetric; ``G``
groups) against ``2 · H · 4 · D`` for FP32.

**Attention sinks** (``sink_tokens = N``): the first ``N`` cache positions stay in an
FP16 side cache; the graph sends ``min(S, N − Ps)`` of the new rows there
(``Ps`` = current sink length) and quantizes the rest, so the runtime only appends.
RotateKV instead picks sink tokens per layer by the top-20 ``|hidden|`` entries; a
positional sink catches the massive-activation first token (BOS) the same way and
needs no ``TopK``/``ScatterND``.  With left padding the first slots are padding, so
protect ``N`` ≥ the padding length (or feed unpadded rows).

**Key rotation** (``key_rotation``): ``M = R · P`` acting on the flattened
``H · D`` key channels of each token, ``R`` block-diagonal with Hadamard blocks over
``head_group`` adjacent KV heads (``"grouped"``, RotateKV's ``H_G``) or over one head
(``"head"``), ``P`` the calibration-derived channel reordering (``key_order``).
*Deviation from RotateKV*: RotateKV folds ``H_G`` and the reorder into ``k_proj``
(pre-RoPE) and re-applies RoPE to the whole dequantized cache at every step.  The
exported graph caches keys after RoPE and only has the position ids of the new
tokens, so here ``M`` is applied online to the post-RoPE keys before quantization
and ``Mᵀ`` to the dequantized past (one ``MatMul`` with an ``HD × HD`` constant;
``M`` is orthogonal, so without quantization the graph is exact).  The reordering
statistic (RotateKV: signed per-channel sum, ascending ``argsort``) is computed on
the rotated post-RoPE keys from :func:`collect_key_samples`.

**Value rotation** needs no online op: fold a per-head Hadamard into
``v_proj``/``o_proj`` with
``OnlineHadamardPass(targets="attention_out")`` *before* this pass (the cached values
are then stored rotated).  :func:`apply_rotatekv` runs the whole recipe.

The pass records its settings in ``model.metadata_props["onnxq.kv_cache"]`` (JSON)
and refuses a graph that already carries it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import PASS_KEY
from onnxq.passes.hadamard import hadamard_matrix, is_supported

__all__ = [
    "KV_CACHE_KEY",
    "KVCacheResult",
    "QuantizeKVCachePass",
    "apply_rotatekv",
    "collect_key_samples",
    "key_order_from_samples",
    "key_rotation_matrix",
    "quantize_kv_cache",
    "random_calibration",
]

#: ``model.metadata_props`` key holding the JSON settings of a quantized cache.
KV_CACHE_KEY = "onnxq.kv_cache"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_EPS = 1e-5  # smallest scale (float16 keeps it as a subnormal)


@dataclasses.dataclass
class KVCacheResult(ir.passes.PassResult):
    """Result of :class:`QuantizeKVCachePass`.

    Attributes:
        sites: one dict per rewritten cache tensor (layer, kind, packed width, ...).
        skipped: cache tensors left in float, with a ``reason``.
    """

    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ helpers
def _meta(model: ir.Model, key: str) -> int | None:
    value = model.metadata_props.get(key)
    return int(value) if value is not None else None


def _find_sites(graph: ir.Graph) -> list[tuple[int, str, ir.Value, ir.Node, ir.Value]]:
    """``(layer, kind, past input, concat node, new rows)`` for every cache pair."""
    outputs = {v.name: v for v in graph.outputs}
    sites = []
    for value in graph.inputs:
        match = _PAST.match(value.name or "")
        if not match:
            continue
        layer, kind = int(match.group(1)), match.group(2)
        present = outputs.get(f"present.{layer}.{kind}")
        node = present.producer() if present is not None else None
        if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0] is not value:
            sites.append((layer, kind, value, None, None))
            continue
        if node.attributes.get_int("axis", 0) not in (2, -2):
            sites.append((layer, kind, value, None, None))
            continue
        sites.append((layer, kind, value, node, node.inputs[1]))
    return sites


def key_rotation_matrix(kv_heads: int, head_dim: int, *, mode: str | None, head_group: int = 4,
                        seed: int | None = None) -> np.ndarray | None:
    """``R`` over the flattened ``kv_heads · head_dim`` key channels (float64), or None.

    ``mode``: None (no rotation), ``"head"`` (one Hadamard per head) or ``"grouped"``
    (one Hadamard over ``head_group`` adjacent heads; fewer when ``kv_heads`` is not a
    multiple).
    """
    if mode is None:
        return None
    if mode == "head":
        group = 1
    elif mode == "grouped":
        group = math.gcd(max(1, head_group), kv_heads)
    else:
        raise ValueError(f"key_rotation must be None, 'head' or 'grouped', got {mode!r}")
    n = group * head_dim
    if not is_supported(n):
        raise ValueError(f"no Hadamard matrix of order {n} (head_dim {head_dim} x {group} heads)")
    h = hadamard_matrix(n, seed=seed)
    return np.kron(np.eye(kv_heads // group), h)


def collect_key_samples(model: ir.Model, token_ids: Iterable[np.ndarray], *,
                        max_rows: int = 8192) -> dict[int, np.ndarray]:
    """New-token keys (post-RoPE, as cached) of every layer, ``[rows, kv_heads · head_dim]``.

    Runs a copy of the FP decoder in onnxruntime with an empty cache on each
    ``[batch, T]`` (or ``[T]``) array of ``token_ids`` (no padding).
    """
    import onnx
    import onnxruntime as ort

    sites = [s for s in _find_sites(model.graph) if s[3] is not None and s[1] == "key"]
    if not sites:
        raise ValueError("no past_key_values.{i}.key -> present.{i}.key Concat found")
    proto = ir.serde.serialize_model(model)
    names = {}
    for layer, _, _, _, new in sites:
        names[layer] = new.name
        proto.graph.output.append(onnx.helper.make_tensor_value_info(new.name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in names}
    for ids in token_ids:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, t = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        for name, arg in inputs.items():
            if _PAST.match(name):
                shape = [b, arg.shape[1], 0, arg.shape[3]]
                feeds[name] = np.zeros(shape, np.float32)
        out = session.run([names[layer] for layer in names], feeds)
        for layer, k in zip(names, out):  # [B, H, T, D] -> [B·T, H·D]
            rows[layer].append(k.transpose(0, 2, 1, 3).reshape(b * t, -1))
    result = {}
    for layer, parts in rows.items():
        x = np.concatenate(parts, axis=0)
        if len(x) > max_rows:
            x = x[np.random.default_rng(0).choice(len(x), max_rows, replace=False)]
        result[layer] = x.astype(np.float64)
    return result


def key_order_from_samples(samples: dict[int, np.ndarray], rotation: np.ndarray | None = None, *,
                           statistic: str = "sum") -> dict[int, np.ndarray]:
    """RotateKV's channel order per layer: ``argsort`` of a per-channel statistic of ``K · R``.

    ``statistic``: ``"sum"`` (RotateKV's signed sum over all tokens) or ``"absmax"``
    (largest magnitude; groups outlier channels together).
    """
    orders = {}
    for layer, x in samples.items():
        y = x @ rotation if rotation is not None else x
        if statistic == "sum":
            stat = y.sum(axis=0)
        elif statistic == "absmax":
            stat = np.abs(y).max(axis=0)
        else:
            raise ValueError(f"unknown statistic {statistic!r}")
        orders[layer] = np.argsort(stat, kind="stable")
    return orders


# ------------------------------------------------------------------ builder
class _Builder:
    """Appends nodes with unique, prefixed names; makes constants as initializers."""

    def __init__(self, graph: ir.Graph, prefix: str, pass_name: str, module: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self.count = 0
        self.meta = {PASS_KEY: pass_name, "onnxq.module": module}

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}.{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> ir.Value:
        name = self._name(hint)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None,
           hint: str | None = None, out: ir.Value | None = None) -> ir.Value:
        name = self._name(hint or op_type.lower())
        if out is None:
            out = ir.Value(name=name)
        self.nodes.append(ir.node(op_type, list(inputs), attrs, outputs=[out], name=f"{name}_node",
                                  metadata_props=dict(self.meta)))
        return out

    def i64(self, hint: str, values: Sequence[int]) -> ir.Value:
        return self.const(hint, np.array(values, dtype=np.int64))


# ------------------------------------------------------------------ pass
class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Store the KV cache as packed ``bits``-bit codes with per-token, per-group scales.

    Args:
        bits: 8, 4 or 2.
        group_size: channels per quantization group (default: 128, or ``head_dim`` when
            smaller); must divide ``head_dim``.
        symmetric: symmetric codes (no zero/minimum tensor) instead of min/max.
        sink_tokens: keep the first ``N`` cache positions in an FP16 side cache.
        key_rotation: None, ``"head"`` or ``"grouped"`` (see the module docstring).
        head_group: KV heads per Hadamard block for ``"grouped"`` (RotateKV: 4).
        key_order: per-layer permutation of the ``kv_heads · head_dim`` rotated key
            channels (:func:`key_order_from_samples`), or None.
        seed: random Hadamard signs for the key rotation (None: plain).
        kinds: which cache tensors to quantize (``("key", "value")``).
    """

    def __init__(self, *, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                 sink_tokens: int = 0, key_rotation: str | None = None, head_group: int = 4,
                 key_order: dict[int, np.ndarray] | None = None, seed: int | None = None,
                 kinds: Sequence[str] = ("key", "value")) -> None:
        super().__init__()
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
        if sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.sink_tokens = int(sink_tokens)
        self.key_rotation = key_rotation
        self.head_group = head_group
        self.key_order = key_order
        self.seed = seed
        self.kinds = tuple(kinds)

    def call(self, model: ir.Model) -> KVCacheResult:
        result = KVCacheResult(model, False)
        if KV_CACHE_KEY in model.metadata_props:
            raise ValueError("the model's KV cache is already quantized")
        graph = model.graph
        sites = _find_sites(graph)
        if not sites:
            return result
        head_dim = None
        group_size = None
        rotations: dict[int, np.ndarray] = {}
        for layer, kind, past, concat, new in sites:
            if kind not in self.kinds:
                continue
            if concat is None:
                result.skipped.append({"layer": layer, "kind": kind,
                                       "reason": "present is not Concat(past, new) on axis 2"})
                continue
            shape = past.shape
            if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                result.skipped.append({"layer": layer, "kind": kind, "reason": f"past shape {shape} is not static in H, D"})
                continue
            heads, d = int(shape[1]), int(shape[3])
            g = self.group_size or min(128, d)
            if d % g or (g * self.bits) % 8:
                raise ValueError(f"group_size {g} must divide head_dim {d} (and hold whole bytes)")
            head_dim, group_size = d, g
            matrix = None
            if kind == "key":
                r = key_rotation_matrix(heads, d, mode=self.key_rotation, head_group=self.head_group, seed=self.seed)
                order = None if self.key_order is None else self.key_order.get(layer)
                if r is not None or order is not None:
                    matrix = r if r is not None else np.eye(heads * d)
                    if order is not None:
                        order = np.asarray(order, dtype=np.int64)
                        if sorted(order.tolist()) != list(range(heads * d)):
                            raise ValueError(f"key_order[{layer}] is not a permutation of {heads * d} channels")
                        matrix = matrix[:, order]
                    rotations[layer] = matrix
            self._rewrite(graph, layer, kind, past, concat, new, heads, d, g, matrix)
            result.sites.append({"layer": layer, "kind": kind, "heads": heads, "head_dim": d,
                                 "group_size": g, "bits": self.bits,
                                 "rotated": matrix is not None})
            result.modified = True
        if result.modified:
            model.metadata_props[KV_CACHE_KEY] = json.dumps({
                "bits": self.bits, "group_size": group_size, "head_dim": head_dim,
                "symmetric": self.symmetric, "sink_tokens": self.sink_tokens,
                "key_rotation": self.key_rotation, "head_group": self.head_group,
                "key_reorder": self.key_order is not None, "layout": "append",
                "scale_dtype": "float16", "kinds": list(self.kinds),
            }, sort_keys=True)
        return result

    # -------------------------------------------------------------- rewrite
    def _rewrite(self, graph: ir.Graph, layer: int, kind: str, past: ir.Value, concat: ir.Node,
                 new: ir.Value, heads: int, d: int, g: int, matrix: np.ndarray | None) -> None:
        bits, n_groups = self.bits, d // g
        per_byte = 8 // bits
        packed = d // per_byte
        qmax = float(2**bits - 1)
        base = f"past_key_values.{layer}.{kind}"
        out_base = f"present.{layer}.{kind}"
        module = concat.metadata_props.get("onnxq.module", f"layer{layer}")
        b = _Builder(graph, f"kvq.{layer}.{kind}", type(self).__name__, module)
        present = concat.outputs[0]

        # new graph inputs
        past_dim = "quantized_sequence" if self.sink_tokens else "past_sequence"
        f16 = ir.TensorType(ir.DataType.FLOAT16)

        def gin(name, dtype, last, seq=past_dim):
            return ir.Value(name=name, type=dtype, shape=ir.Shape(["batch", heads, seq, last]))

        q_in = gin(base, ir.TensorType(ir.DataType.UINT8), packed)
        s_in = gin(f"{base}_scale", f16, n_groups)
        z_in = None if self.symmetric else gin(f"{base}_zero", f16, n_groups)
        sink_in = gin(f"{base}_sink", f16, d, "sink_sequence") if self.sink_tokens else None
        new_inputs = [v for v in (q_in, s_in, z_in, sink_in) if v is not None]
        pos = list(graph.inputs).index(past)
        graph.inputs.pop(pos)
        for offset, value in enumerate(new_inputs):
            graph.inputs.insert(pos + offset, value)

        # ---- read: unpack + dequantize the past
        write = b
        b = _Builder(graph, f"kvq.{layer}.{kind}.read", type(self).__name__, module)
        read = b
        lead0 = [0, 0, 0]
        codes = q_in
        if bits < 8:
            unsq = b.op("Unsqueeze", [q_in, b.i64("axes", [-1])])
            shifts = b.const("shifts", np.arange(0, 8, bits, dtype=np.uint8))
            shifted = b.op("BitShift", [unsq, shifts], {"direction": "RIGHT"})
            masked = b.op("BitwiseAnd", [shifted, b.const("mask", np.array(int(qmax), np.uint8))])
            codes = b.op("Reshape", [masked, b.i64("shape_d", lead0 + [d])])
        codes_f = b.op("Cast", [codes], {"to": ir.DataType.FLOAT})
        grouped = b.op("Reshape", [codes_f, b.i64("shape_g", lead0 + [n_groups, g])])
        scale_f = b.op("Unsqueeze", [b.op("Cast", [s_in], {"to": ir.DataType.FLOAT}), b.i64("axes", [-1])])
        if self.symmetric:
            centred = b.op("Sub", [grouped, b.const("mid", np.array(2.0 ** (bits - 1), np.float32))])
            deq = b.op("Mul", [centred, scale_f])
        else:
            zero_f = b.op("Unsqueeze", [b.op("Cast", [z_in], {"to": ir.DataType.FLOAT}), b.i64("axes", [-1])])
            deq = b.op("Add", [b.op("Mul", [grouped, scale_f]), zero_f])
        deq = b.op("Reshape", [deq, b.i64("shape_d", lead0 + [d])], hint="dequantized")
        if matrix is not None:
            deq = self._rotate(b, deq, matrix.T, heads, d, "unrotated")
        if self.sink_tokens:
            sink_f = b.op("Cast", [sink_in], {"to": ir.DataType.FLOAT})
            deq = b.op("Concat", [sink_f, deq], {"axis": 2}, hint="past")
        # deq is now what the FP input was: every other reader (Shape) gets it too
        deq.shape = past.shape
        deq.type = past.type
        b = write

        # ---- split the new rows between the sink cache and the quantized cache
        to_quant = new
        sink_out = None
        if self.sink_tokens:
            seq_new = b.op("Shape", [new], {"start": 2, "end": 3})
            seq_sink = b.op("Shape", [sink_in], {"start": 2, "end": 3})
            room = b.op("Sub", [b.i64("n_sink", [self.sink_tokens]), seq_sink])
            n_s = b.op("Max", [b.op("Min", [seq_new, room]), b.i64("zero", [0])])
            axis2 = b.i64("axis2", [2])
            head = b.op("Slice", [new, b.i64("zero", [0]), n_s, axis2])
            to_quant = b.op("Slice", [new, n_s, b.i64("end", [2**62]), axis2])
            sink_out = ir.Value(name=f"{out_base}_sink", type=f16,
                                shape=ir.Shape(["batch", heads, "sink_new", d]))
            b.op("Cast", [head], {"to": ir.DataType.FLOAT16}, out=sink_out)
        parts = [deq, new]

        # ---- write: quantize + pack the new (non-sink) rows
        x = to_quant
        if matrix is not None:
            x = self._rotate(b, x, matrix, heads, d, "rotated")
        xg = b.op("Reshape", [x, b.i64("shape_g", lead0 + [n_groups, g])])
        axes = b.i64("axes", [-1])
        if self.symmetric:
            qpos = float(2 ** (bits - 1) - 1) if bits > 2 else 1.0
            amax = b.op("ReduceMax", [b.op("Abs", [xg]), axes], {"keepdims": 1})
            scale = b.op("Max", [b.op("Div", [amax, b.const("qpos", np.array(qpos, np.float32))]),
                                 b.const("eps", np.array(_EPS, np.float32))])
            scale16 = b.op("Cast", [scale], {"to": ir.DataType.FLOAT16})
            s32 = b.op("Cast", [scale16], {"to": ir.DataType.FLOAT})
            q = b.op("Round", [b.op("Div", [xg, s32])])
            q = b.op("Clip", [q, b.const("lo", np.array(-qpos, np.float32)), b.const("hi", np.array(qpos, np.float32))])
            q = b.op("Add", [q, b.const("mid", np.array(2.0 ** (bits - 1), np.float32))])
            zero16 = None
        else:
            mn = b.op("ReduceMin", [xg, axes], {"keepdims": 1})
            mx = b.op("ReduceMax", [xg, axes], {"keepdims": 1})
            scale = b.op("Max", [b.op("Div", [b.op("Sub", [mx, mn]), b.const("qmax", np.array(qmax, np.float32))]),
                                 b.const("eps", np.array(_EPS, np.float32))])
            scale16 = b.op("Cast", [scale], {"to": ir.DataType.FLOAT16})
            zero16 = b.op("Cast", [mn], {"to": ir.DataType.FLOAT16})
            s32 = b.op("Cast", [scale16], {"to": ir.DataType.FLOAT})
            z32 = b.op("Cast", [zero16], {"to": ir.DataType.FLOAT})
            q = b.op("Round", [b.op("Div", [b.op("Sub", [xg, z32]), s32])])
            q = b.op("Clip", [q, b.const("lo", np.array(0.0, np.float32)), b.const("hi", np.array(qmax, np.float32))])
        if bits < 8:
            qp = b.op("Reshape", [q, b.i64("shape_p", lead0 + [packed, per_byte])])
            weights = b.const("pack", (2.0 ** (bits * np.arange(per_byte))).astype(np.float32))
            q = b.op("ReduceSum", [b.op("Mul", [qp, weights]), axes], {"keepdims": 0})
        else:
            q = b.op("Reshape", [q, b.i64("shape_d", lead0 + [d])])
        q_out = ir.Value(name=out_base, type=ir.TensorType(ir.DataType.UINT8),
                         shape=ir.Shape(["batch", heads, "quantized_new", packed]))
        b.op("Cast", [q], {"to": ir.DataType.UINT8}, out=q_out)
        squeeze_shape = b.i64("shape_s", lead0 + [n_groups])
        s_out = ir.Value(name=f"{out_base}_scale", type=f16, shape=ir.Shape(["batch", heads, "quantized_new", n_groups]))
        b.op("Reshape", [scale16, squeeze_shape], out=s_out)
        z_out = None
        if zero16 is not None:
            z_out = ir.Value(name=f"{out_base}_zero", type=f16, shape=ir.Shape(["batch", heads, "quantized_new", n_groups]))
            b.op("Reshape", [zero16, squeeze_shape], out=z_out)

        # ---- attention input: sink + dequantized past + exact new rows
        full = b.op("Concat", parts, {"axis": 2}, hint="attention_cache")
        full.shape = present.shape
        full.type = present.type
        graph.insert_before(concat, b.nodes)
        graph.insert_before(next(iter(graph)), read.nodes)
        out_pos = list(graph.outputs).index(present)
        graph.outputs.pop(out_pos)
        present.replace_all_uses_with(full)
        graph.remove(concat, safe=True)
        past.replace_all_uses_with(deq)
        for offset, value in enumerate(v for v in (q_out, s_out, z_out, sink_out) if v is not None):
            graph.outputs.insert(out_pos + offset, value)

    @staticmethod
    def _rotate(b: _Builder, x: ir.Value, matrix: np.ndarray, heads: int, d: int, hint: str) -> ir.Value:
        """``x [B, H, T, D]`` → per token ``flatten(H, D) · matrix`` → ``[B, H, T, D]``."""
        t = b.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
        flat = b.op("Reshape", [t, b.i64("shape_flat", [0, 0, heads * d])])
        rot = b.op("MatMul", [flat, b.const(f"{hint}_matrix", matrix.astype(np.float32))])
        back = b.op("Reshape", [rot, b.i64("shape_hd", [0, 0, heads, d])])
        return b.op("Transpose", [back], {"perm": [0, 2, 1, 3]}, hint=hint)


# ------------------------------------------------------------------ recipe
def apply_rotatekv(model: ir.Model, *, bits: int = 2, group_size: int | None = None,
                   rotate_values: bool = True, key_rotation: str | None = "grouped",
                   head_group: int = 4, reorder: bool = True,
                   calibration: Iterable[np.ndarray] | None = None, reorder_statistic: str = "sum",
                   sink_tokens: int = 1, symmetric: bool = False,
                   seed: int | None = None) -> KVCacheResult:
    """The RotateKV recipe with every piece switchable (in place on ``model``).

    1. ``rotate_values``: per-head Hadamard folded into ``v_proj``/``o_proj``
       (``OnlineHadamardPass(targets="attention_out")``);
    2. ``key_rotation``: online (post-RoPE) Hadamard over ``head_group`` KV heads;
    3. ``reorder``: channel order from ``calibration`` (token-id arrays) keys;
    4. ``sink_tokens``: first positions in an FP16 side cache;
    5. ``bits``-bit per-token, per-group cache (:class:`QuantizeKVCachePass`).
    """
    if rotate_values:
        from onnxq.passes.online_hadamard import OnlineHadamardPass

        OnlineHadamardPass(targets="attention_out", seed=seed, head_dim=_meta(model, "onnxq.head_dim"))(model)
    order = None
    if reorder:
        if calibration is None:
            raise ValueError("reorder=True needs calibration token ids")
        samples = collect_key_samples(model, calibration)
        heads = _meta(model, "onnxq.num_kv_heads")
        d = _meta(model, "onnxq.head_dim")
        if heads is None or d is None:
            x = next(iter(samples.values()))
            raise ValueError(f"the model has no onnxq.num_kv_heads/head_dim metadata ({x.shape[1]} key channels)")
        r = key_rotation_matrix(heads, d, mode=key_rotation, head_group=head_group, seed=seed)
        order = key_order_from_samples(samples, r, statistic=reorder_statistic)
    return QuantizeKVCachePass(bits=bits, group_size=group_size, symmetric=symmetric, sink_tokens=sink_tokens,
                               key_rotation=key_rotation, head_group=head_group, key_order=order,
                               seed=seed)(model)


def random_calibration(model: ir.Model, *, count: int = 8, length: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``count`` sequences of BOS + random token ids (fallback data for the key reordering)."""
    vocab = _meta(model, "onnxq.vocab_size") or 256
    bos = _meta(model, "onnxq.bos_token_id")
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(count):
        ids = rng.integers(min(3, vocab - 1), vocab, length).astype(np.int64)
        if bos is not None:
            ids[0] = bos
        seqs.append(ids)
    return seqs


def quantize_kv_cache(model: ir.Model, *, bits: int, group_size: int | None = None,
                      calibration: Iterable[np.ndarray] | None = None, rotatekv: bool = True,
                      sink_tokens: int = 1) -> KVCacheResult:
    """What ``--kv-bits`` does: the RotateKV recipe (or plain min/max with ``rotatekv=False``).

    Without ``calibration`` the key reordering is calibrated on :func:`random_calibration`.
    """
    if model.metadata_props.get("onnxq.task") not in (None, "text-generation"):
        raise ValueError("--kv-bits applies to text-generation (decoder) models only")
    if not rotatekv:
        return QuantizeKVCachePass(bits=bits, group_size=group_size, sink_tokens=sink_tokens)(model)
    if calibration is None:
        calibration = random_calibration(model)
    return apply_rotatekv(model, bits=bits, group_size=group_size, calibration=calibration,
                          sink_tokens=sink_tokens)
