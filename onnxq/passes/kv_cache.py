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
  minimum) or ``x = (q − 2^(b−1)) · s`` (symmetric).  Attention reads
  ``Concat(sink, dequantized past, new)``, so the tokens of the current run are exact;
* *write*: the new rows (minus those that go to the sink cache) are split into groups
  of ``group_size`` channels, quantized per token and group with min/max
  (``ReduceMin``/``ReduceMax`` → ``Round`` → ``Clip``; the scale and minimum are
  rounded to float16 first so the codes match what is stored) and packed ``8 / bits``
  codes per byte (``Mul`` by ``2^(j·b)`` + ``ReduceSum`` + ``Cast``).

Cache bytes per token and layer: ``2 · H · (D·b/8 + 2·G + 2·G)`` (asymmetric; ``G``
groups) against ``2 · H · 4 · D`` for FP32.

**Attention sinks** (``sink_tokens = N``): the first ``N`` cache positions stay in an
FP16 side cache; the graph sends ``min(S, N − Ps)`` of the new rows there
(``Ps`` = current sink length) and quantizes the rest, so the runtime only appends.
RotateKV instead picks sink tokens per layer by the top-20 ``|hidden|`` entries; a
positional sink catches the massive-activation first token (BOS) the same way and
needs no ``TopK``/``ScatterND``.  With left padding the first slots are padding, so
protect ``N`` ≥ the padding length (or feed unpadded rows).

**Key transform** ``M = R · P`` acting on the flattened ``H · D`` key channels of each
token: ``R`` block-diagonal with one Hadamard block over ``head_group`` adjacent KV
heads (``key_rotation="grouped"``, RotateKV's ``H_G``) or over one head (``"head"``),
optionally with random signs (``seed``), then ``P`` the calibration-derived channel
reordering (``key_order``, a gather of channels: ``K · M = (K · R)[:, order]``).
``key_placement`` says where it acts:

* ``"pre_rope"`` (the default when keys are rotated or reordered; RotateKV's released
  code): the cache stores the quantized **pre-RoPE** keys ``K_pre · M``.  ``M`` is
  folded into the output columns of ``k_proj`` (weight ``W ← W · M``, bias
  ``b ← b · M``, e.g. Qwen2), so the write path has no extra op.  Where the graph
  cannot fold -- Qwen3's per-head ``k_norm`` RMSNorm sits between ``k_proj`` and RoPE
  and a cross-head rotation would not commute with it; a ``k_proj`` weight that is
  already quantized (``DequantizeLinear``) -- ``M`` is applied online just before RoPE
  (after ``k_norm``) instead; the pass result says so per layer
  (``sites[…]["key_transform"]`` and ``["reason"]``).  Read path: dequantize the past
  codes → ``Concat(sink, past, new)`` (all pre-RoPE, in the rotated domain) → ``· Mᵀ``
  (``Gather`` with the inverse order, then one ``MatMul`` per ``n × n`` Hadamard block:
  the block-diagonal form of ``R``) → RoPE for the positions of **all** cache tokens →
  attention.  The new tokens keep their ``position_ids``; the ``L`` cached tokens get
  ``position_ids[:, :1] − L + arange(L)`` (the runtime feeds consecutive positions,
  ``cumsum(mask) − 1`` with left padding, so real tokens get their own positions and
  padded slots, masked anyway, get negative ones).  The ``cos``/``sin`` of those
  positions come from a clone of the graph's own subgraph ``position_ids → cos, sin``
  (so LLaMA, Qwen2/3 and scaled RoPE variants all work), and the graph's own RoPE
  nodes of the layer are cloned onto the concatenated cache.  *Cost*: every step
  rotates back and re-applies RoPE to the whole cache (``O(L · H · D · n)`` for ``Mᵀ``
  plus ``O(L · D)`` for ``cos``/``sin``/RoPE per layer), as RotateKV's simulation does;
  an optimised kernel would fuse this into attention.  Models without RoPE (OPT) just
  get the fold and ``Mᵀ`` on the read path;
* ``"post_rope"`` (the former mode, kept for comparison): the cache stores post-RoPE
  keys as the exported graph does; ``M`` is applied online to the post-RoPE new keys
  before quantization and ``Mᵀ`` to the dequantized past (``M`` is orthogonal, so
  without quantization the graph is exact).

The reordering statistic (RotateKV: signed per-channel sum, ascending ``argsort``) is
computed on the rotated keys of the same placement (:func:`collect_key_samples`,
:func:`key_order_from_samples`).

**Value rotation** needs no online op: fold a per-head Hadamard into
``v_proj``/``o_proj`` with
``OnlineHadamardPass(targets="attention_out")`` *before* this pass (the cached values
are then stored rotated).  :func:`apply_rotatekv` runs the whole recipe.

The pass records its settings in ``model.metadata_props["onnxq.kv_cache"]`` (JSON,
including ``key_placement`` and the position rule) and refuses a graph that already
carries it.  ``quantize=False`` keeps every rewrite but stores float32 rows (no
rounding): a check that the folds, rotations and RoPE re-application are exact.
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

from onnxq.passes._ir_utils import PASS_KEY, const_array
from onnxq.passes.hadamard import hadamard_matrix, is_supported

__all__ = [
    "KEY_PLACEMENTS",
    "KV_CACHE_KEY",
    "KVCacheResult",
    "POSITION_RULE",
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

#: Where the key transform acts (see the module docstring).
KEY_PLACEMENTS: tuple[str, ...] = ("pre_rope", "post_rope")

#: How the pre-RoPE read path derives the positions of the ``L`` cached tokens.
POSITION_RULE = "position_ids[:, :1] - L + arange(L)"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_POSITIONS = "position_ids"
_EPS = 1e-5  # smallest scale (float16 keeps it as a subnormal)
_MAX_ROPE_NODES = 48


@dataclasses.dataclass
class KVCacheResult(ir.passes.PassResult):
    """Result of :class:`QuantizeKVCachePass`.

    Attributes:
        sites: one dict per rewritten cache tensor (layer, kind, packed width, key
            placement, ``key_transform`` = ``"folded into k_proj"`` / ``"online before
            RoPE"`` / ``"online after RoPE"`` / None, ``reason`` when not folded, ...).
        skipped: cache tensors left in float, with a ``reason``.
        notes: human-readable remarks (e.g. layers where the fold was impossible).
    """

    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


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


def _rotation_block(kv_heads: int, head_dim: int, mode: str | None, head_group: int,
                    seed: int | None) -> np.ndarray | None:
    """The ``n × n`` Hadamard block of ``R`` (``n`` = heads per block · ``head_dim``), or None."""
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
    return hadamard_matrix(n, seed=seed)


def key_rotation_matrix(kv_heads: int, head_dim: int, *, mode: str | None, head_group: int = 4,
                        seed: int | None = None) -> np.ndarray | None:
    """``R`` over the flattened ``kv_heads · head_dim`` key channels (float64), or None.

    ``mode``: None (no rotation), ``"head"`` (one Hadamard per head) or ``"grouped"``
    (one Hadamard over ``head_group`` adjacent heads; fewer when ``kv_heads`` is not a
    multiple).  The same block (with the same random signs for a ``seed``) repeats
    along the diagonal.
    """
    block = _rotation_block(kv_heads, head_dim, mode, head_group, seed)
    if block is None:
        return None
    return np.kron(np.eye(kv_heads * head_dim // len(block)), block)


@dataclasses.dataclass(frozen=True)
class _KeyTransform:
    """``M = R · P``: ``R`` = ``block`` repeated on the diagonal, ``P`` = gather of ``order``."""

    channels: int
    block: np.ndarray | None
    order: np.ndarray | None

    def matrix(self) -> np.ndarray:
        m = np.eye(self.channels)
        if self.block is not None:
            m = np.kron(np.eye(self.channels // len(self.block)), self.block)
        return m if self.order is None else m[:, self.order]


def _input_deps(graph: ir.Graph) -> dict[ir.Value, frozenset[str]]:
    """For every value of ``graph``: the names of the graph inputs it depends on."""
    deps: dict[ir.Value, frozenset[str]] = {v: frozenset([v.name]) for v in graph.inputs}
    empty: frozenset[str] = frozenset()
    for node in graph:
        found = empty.union(*(deps.get(v, empty) for v in node.inputs if v is not None))
        for out in node.outputs:
            deps[out] = found
    return deps


def _position_only(value: ir.Value, deps: dict[ir.Value, frozenset[str]]) -> bool:
    return deps.get(value, frozenset()) == frozenset([_POSITIONS])


def _what(node: ir.Node | None) -> str:
    if node is None:
        return "a graph input"
    module = node.metadata_props.get("onnxq.module")
    return f"{node.op_type} ({module})" if module else node.op_type


@dataclasses.dataclass
class _Fold:
    """``k_proj`` as seen from the keys: the MatMul and its constant weight / bias."""

    matmul: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    add: ir.Node | None


def _k_proj_of(x: ir.Value, channels: int) -> _Fold | str:
    """Walk ``x`` = Transpose(Reshape([Add(bias)] MatMul(h, W))) back to ``k_proj``.

    Returns the fold target, or the reason why ``x`` is not such a chain.
    """
    node = x.producer()
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return f"{_what(node)} between k_proj and RoPE"
    chain = [node.inputs[0]]
    node = chain[-1].producer()
    if node is None or node.op_type != "Reshape":
        return f"{_what(node)} between k_proj and RoPE"
    chain.append(node.inputs[0])
    node = chain[-1].producer()
    bias = add = None
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        for i in (0, 1):
            c = node.inputs[1 - i]
            arr = const_array(c)
            if arr is not None and c.is_initializer() and arr.size == channels:
                bias, add = c, node
                chain.append(node.inputs[i])
                node = chain[-1].producer()
                break
        else:
            return f"{_what(node)} between k_proj and RoPE"
    if node is None or node.op_type != "MatMul":
        return f"{_what(node)} between k_proj and RoPE"
    weight = node.inputs[1]
    arr = const_array(weight)
    if arr is None or not weight.is_initializer():
        return (f"k_proj weight is not an initializer (it comes from {_what(weight.producer())}; "
                "an already quantized weight cannot take the fold)")
    if arr.ndim != 2 or arr.shape[1] != channels:
        return f"k_proj weight has shape {arr.shape}, expected [in, {channels}]"
    for value in chain:
        if value.is_graph_output() or len(value.consumers()) != 1:
            return f"the k_proj output {value.name!r} has other readers"
    return _Fold(node, weight, bias, add)


def _rope_nodes(graph: ir.Graph, new: ir.Value, x: ir.Value,
                deps: dict[ir.Value, frozenset[str]]) -> list[ir.Node] | None:
    """The nodes computing ``new`` from ``x``, constants and position-only values, or None."""
    region: dict[ir.Node, None] = {}
    stack = [new]
    uses_positions = False
    while stack:
        value = stack.pop()
        if value is x:
            continue
        found = deps.get(value, frozenset())
        if not found:
            continue
        if found == frozenset([_POSITIONS]):
            uses_positions = True
            continue
        node = value.producer()
        if node is None:
            return None
        if node in region:
            continue
        region[node] = None
        if len(region) > _MAX_ROPE_NODES:
            return None
        stack.extend(v for v in node.inputs if v is not None)
    if not uses_positions:
        return None
    return [n for n in graph if n in region]


def _match_rope(graph: ir.Graph, new: ir.Value,
                deps: dict[ir.Value, frozenset[str]]) -> tuple[ir.Value, list[ir.Node]] | None:
    """``(pre-RoPE key, RoPE nodes)`` for ``new = Add(Mul(k, cos), Mul(rot(k), sin))``."""
    node = new.producer()
    if node is None or node.op_type != "Add" or len(node.inputs) != 2:
        return None
    candidates = []
    for value in node.inputs:
        mul = value.producer() if value is not None else None
        if mul is None or mul.op_type != "Mul":
            return None
        candidates += [v for v in mul.inputs if v is not None and deps.get(v) and not _position_only(v, deps)]
    for x in candidates:
        nodes = _rope_nodes(graph, new, x, deps)
        if nodes is not None:
            return x, nodes
    return None


@dataclasses.dataclass
class _KeyPath:
    """The pre-RoPE key of one layer: ``x`` [B, H, S, D], RoPE nodes ``x → new``, fold target."""

    x: ir.Value
    rope: list[ir.Node]
    fold: _Fold | None
    reason: str | None


def _key_path(graph: ir.Graph, layer: int, new: ir.Value, concat: ir.Node,
              deps: dict[ir.Value, frozenset[str]], channels: int) -> _KeyPath:
    """Find the pre-RoPE keys of ``layer``; ValueError when the graph has no usable pattern."""
    direct = _k_proj_of(new, channels)
    if isinstance(direct, _Fold):  # no RoPE (OPT: learned positions on the embeddings)
        if set(new.consumers()) <= {concat}:
            return _KeyPath(new, [], direct, None)
        return _KeyPath(new, [], None, "the new keys have readers besides the cache Concat")
    match = _match_rope(graph, new, deps)
    if match is None:
        raise ValueError(
            f"layer {layer}: present.{layer}.key is neither a k_proj output nor "
            "RoPE(k) = k·cos + rotate(k)·sin with cos/sin computed from position_ids only; "
            "the pre-RoPE key path needs one of them (use key_placement='post_rope')")
    x, rope = match
    fold = _k_proj_of(x, channels)
    if isinstance(fold, str):
        return _KeyPath(x, rope, None, fold)
    if not set(x.consumers()) <= set(rope):
        return _KeyPath(x, rope, None, "the pre-RoPE keys have readers besides RoPE")
    return _KeyPath(x, rope, fold, None)


def _resolve_placement(placement: str | None, transformed: bool) -> str:
    if placement is None:
        return "pre_rope" if transformed else "post_rope"
    if placement not in KEY_PLACEMENTS:
        raise ValueError(f"key_placement must be one of {KEY_PLACEMENTS} or None, got {placement!r}")
    return placement


def collect_key_samples(model: ir.Model, token_ids: Iterable[np.ndarray], *,
                        key_placement: str = "pre_rope", max_rows: int = 8192) -> dict[int, np.ndarray]:
    """New-token keys of every layer, ``[rows, kv_heads · head_dim]`` (float64).

    ``key_placement="pre_rope"`` returns the keys RoPE reads (after ``k_norm`` for
    Qwen3; the ``k_proj`` output for models without RoPE), ``"post_rope"`` the keys
    the FP graph caches.  Runs a copy of the FP decoder in onnxruntime with an empty
    cache on each ``[batch, T]`` (or ``[T]``) array of ``token_ids`` (no padding).
    """
    import onnx
    import onnxruntime as ort

    if key_placement not in KEY_PLACEMENTS:
        raise ValueError(f"key_placement must be one of {KEY_PLACEMENTS}, got {key_placement!r}")
    sites = [s for s in _find_sites(model.graph) if s[3] is not None and s[1] == "key"]
    if not sites:
        raise ValueError("no past_key_values.{i}.key -> present.{i}.key Concat found")
    deps = _input_deps(model.graph) if key_placement == "pre_rope" else {}
    names = {}
    for layer, _, past, concat, new in sites:
        value = new
        if key_placement == "pre_rope":
            shape = past.shape
            channels = int(shape[1]) * int(shape[3]) if shape is not None and len(shape) == 4 else -1
            value = _key_path(model.graph, layer, new, concat, deps, channels).x
        if not value.name:
            raise ValueError(f"layer {layer}: the key tensor has no name")
        names[layer] = value.name
    proto = ir.serde.serialize_model(model)
    for name in names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
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
        if _POSITIONS in inputs:
            feeds[_POSITIONS] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
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

    ``statistic``: ``"sum"`` (RotateKV's signed sum over all tokens, ascending) or
    ``"absmax"`` (largest magnitude; groups outlier channels together).
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

    def clone(self, node: ir.Node, inputs: Sequence[ir.Value | None]) -> list[ir.Value]:
        """A copy of ``node`` reading ``inputs``; returns its new outputs."""
        for attr in node.attributes.values():
            if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise ValueError(f"cannot copy {_what(node)}: it has a subgraph or reference attribute")
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        outputs = [ir.Value(name=self._name(f"{o.name or 'out'}")) for o in node.outputs]
        meta = dict(node.metadata_props)
        meta[PASS_KEY] = self.meta[PASS_KEY]
        self.nodes.append(ir.Node(node.domain, node.op_type, list(inputs), attrs, outputs=outputs,
                                  version=node.version, name=self._name(f"{node.name or node.op_type}_copy"),
                                  metadata_props=meta))
        return outputs


def _apply_transform(b: _Builder, x: ir.Value, t: _KeyTransform, heads: int, d: int, *,
                     inverse: bool, hint: str) -> ir.Value:
    """``x [B, H, T, D]`` → per token ``flatten(H, D) · M`` (or ``· Mᵀ``) → ``[B, H, T, D]``.

    ``R`` is applied block by block (one ``n × n`` MatMul on ``[…, HD/n, n]``), ``P`` as
    a ``Gather`` of channels (inverse order for ``Mᵀ``).
    """
    hd = heads * d
    n = None if t.block is None else len(t.block)
    block = None if t.block is None else (t.block.T if inverse else t.block).astype(np.float32)
    if t.order is None and n == d:  # one block per head: acts on the last axis as it is
        return b.op("MatMul", [x, b.const(f"{hint}_block", block)], hint=hint)
    y = b.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
    y = b.op("Reshape", [y, b.i64("shape_flat", [0, 0, hd])])

    def mix(value: ir.Value) -> ir.Value:
        if n == hd:
            return b.op("MatMul", [value, b.const(f"{hint}_block", block)])
        blocks = b.op("Reshape", [value, b.i64("shape_blocks", [0, 0, hd // n, n])])
        mixed = b.op("MatMul", [blocks, b.const(f"{hint}_block", block)])
        return b.op("Reshape", [mixed, b.i64("shape_flat", [0, 0, hd])])

    def gather(value: ir.Value, order: np.ndarray) -> ir.Value:
        return b.op("Gather", [value, b.const(f"{hint}_order", order.astype(np.int64))], {"axis": 2})

    if not inverse:
        if t.block is not None:
            y = mix(y)
        if t.order is not None:
            y = gather(y, t.order)
    else:
        if t.order is not None:
            y = gather(y, np.argsort(t.order))
        if t.block is not None:
            y = mix(y)
    y = b.op("Reshape", [y, b.i64("shape_hd", [0, 0, heads, d])])
    return b.op("Transpose", [y], {"perm": [0, 2, 1, 3]}, hint=hint)


class _RopeCloner:
    """Re-applies a layer's RoPE to the whole pre-RoPE cache (shared positions and cos/sin)."""

    def __init__(self, graph: ir.Graph, deps: dict[ir.Value, frozenset[str]], builder: _Builder) -> None:
        self.graph = graph
        self.deps = deps
        self.b = builder
        self.memo: dict[ir.Value, ir.Value] = {}
        positions = [v for v in graph.inputs if v.name == _POSITIONS]
        self.positions = positions[0] if positions else None

    def all_positions(self, cache: ir.Value) -> ir.Value:
        """``Concat(position_ids[:, :1] − L + arange(L), position_ids)`` with ``L`` = cache length."""
        if self.positions in self.memo:
            return self.memo[self.positions]
        if self.positions is None:
            raise ValueError("the graph has RoPE but no position_ids input")
        b, pos = self.b, self.positions
        length = b.op("Shape", [cache], {"start": 2, "end": 3}, hint="cache_length")
        scalar = b.op("Squeeze", [length, b.i64("axes", [0])])
        steps = b.op("Range", [b.const("zero", np.array(0, np.int64)), scalar, b.const("one", np.array(1, np.int64))])
        first = b.op("Slice", [pos, b.i64("zero", [0]), b.i64("one", [1]), b.i64("axis1", [1])])
        start = b.op("Sub", [first, length])
        cached = b.op("Add", [start, b.op("Unsqueeze", [steps, b.i64("axes", [0])])], hint="cached_positions")
        full = b.op("Concat", [cached, pos], {"axis": 1}, hint="all_positions")
        self.memo[pos] = full
        return full

    def value(self, v: ir.Value) -> ir.Value:
        """The copy of a position-only value (cos, sin, ...) computed for all positions."""
        if v in self.memo:
            return self.memo[v]
        found = self.deps.get(v, frozenset())
        if not found:
            return v
        if found != frozenset([_POSITIONS]):
            raise ValueError(f"the RoPE input {v.name!r} depends on {sorted(found)}, not only on "
                             "position_ids; cannot re-apply RoPE to the cache (use key_placement='post_rope')")
        node = v.producer()
        if node is None:
            raise ValueError("position_ids must be fed before cloning its consumers")
        inputs = [None if i is None else self.value(i) for i in node.inputs]
        for old, copy in zip(node.outputs, self.b.clone(node, inputs)):
            self.memo[old] = copy
        return self.memo[v]

    def rope(self, path: _KeyPath, new: ir.Value, cache: ir.Value) -> ir.Value:
        """The layer's RoPE nodes (``path.x → new``) copied onto ``cache`` (all positions).

        ``all_positions`` must have been called first.
        """
        mapping: dict[ir.Value, ir.Value] = {path.x: cache}
        for node in path.rope:
            inputs = []
            for v in node.inputs:
                if v is None or v in mapping:
                    inputs.append(None if v is None else mapping[v])
                elif _position_only(v, self.deps):
                    inputs.append(self.value(v))
                elif not self.deps.get(v):
                    inputs.append(v)
                else:
                    raise ValueError(f"the RoPE node {_what(node)} reads {v.name!r}, which is neither the "
                                     "key, a constant nor a function of position_ids")
            for old, copy in zip(node.outputs, self.b.clone(node, inputs)):
                mapping[old] = copy
        return mapping[new]


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
        layers: only these decoder layers (None: all); the others keep their float
            cache in the exported layout.
        key_placement: ``"pre_rope"`` (cache pre-RoPE keys, fold ``M`` into
            ``k_proj``, re-apply RoPE to the cache), ``"post_rope"`` (cache what the
            graph caches, ``M`` online), or None: ``"pre_rope"`` when keys are rotated
            or reordered, else ``"post_rope"``.
        quantize: False keeps every rewrite but stores float32 rows (no rounding), to
            check that the rewrites are exact.

    Raises:
        ValueError: bad settings; with ``"pre_rope"``, a graph whose keys are neither a
            ``k_proj`` output nor a recognisable RoPE of one.
    """

    def __init__(self, *, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                 sink_tokens: int = 0, key_rotation: str | None = None, head_group: int = 4,
                 key_order: dict[int, np.ndarray] | None = None, seed: int | None = None,
                 kinds: Sequence[str] = ("key", "value"), layers: Iterable[int] | None = None,
                 key_placement: str | None = None, quantize: bool = True) -> None:
        super().__init__()
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
        if sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        if key_rotation not in (None, "head", "grouped"):
            raise ValueError(f"key_rotation must be None, 'head' or 'grouped', got {key_rotation!r}")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.sink_tokens = int(sink_tokens)
        self.key_rotation = key_rotation
        self.head_group = head_group
        self.key_order = key_order
        self.seed = seed
        self.kinds = tuple(kinds)
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.key_placement = _resolve_placement(key_placement, key_rotation is not None or key_order is not None)
        self.quantize = bool(quantize)

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
        pre_rope = self.key_placement == "pre_rope"
        deps = _input_deps(graph) if pre_rope and "key" in self.kinds else {}
        rope_builder = _Builder(graph, "kvq.rope", type(self).__name__, "rotary_emb")
        cloner = _RopeCloner(graph, deps, rope_builder)
        plans = []
        # 1. check every site (and find the pre-RoPE key paths) before changing anything
        for layer, kind, past, concat, new in sites:
            if kind not in self.kinds or (self.layers is not None and layer not in self.layers):
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
            transform = None
            path = None
            if kind == "key":
                block = _rotation_block(heads, d, self.key_rotation, self.head_group, self.seed)
                order = None if self.key_order is None else self.key_order.get(layer)
                if order is not None:
                    order = np.asarray(order, dtype=np.int64)
                    if sorted(order.tolist()) != list(range(heads * d)):
                        raise ValueError(f"key_order[{layer}] is not a permutation of {heads * d} channels")
                if block is not None or order is not None:
                    transform = _KeyTransform(heads * d, block, order)
                if pre_rope:
                    path = _key_path(graph, layer, new, concat, deps, heads * d)
                    others = [c for c in past.consumers() if c is not concat and c.op_type != "Shape"]
                    if others:
                        raise ValueError(f"past_key_values.{layer}.key is read by {_what(others[0])} besides the "
                                         "cache Concat; the pre-RoPE placement cannot rewrite it")
            plans.append((layer, kind, past, concat, new, heads, d, g, transform, path))
        # 2. rewrite
        for layer, kind, past, concat, new, heads, d, g, transform, path in plans:
            site = {"layer": layer, "kind": kind, "heads": heads, "head_dim": d, "group_size": g,
                    "bits": self.bits, "rotated": transform is not None}
            if kind == "key":
                site["placement"] = self.key_placement
                site["key_transform"] = None if transform is None else "online after RoPE"
            if path is not None:
                site["rope"] = bool(path.rope)
                if transform is not None:
                    if path.fold is not None:
                        self._fold(path.fold, transform)
                        site["key_transform"] = "folded into k_proj"
                    else:
                        site["key_transform"] = "online before RoPE"
                        site["reason"] = path.reason
                        result.notes.append(f"layer {layer}: key rotation applied online before RoPE "
                                            f"({path.reason})")
            self._rewrite(graph, layer, kind, past, concat, new, heads, d, g, transform, path, cloner)
            result.sites.append(site)
            result.modified = True
        if rope_builder.nodes:
            graph.extend(rope_builder.nodes)
        if any(p[-1] is not None for p in plans):
            graph.sort()
        if result.modified:
            keys = [s for s in result.sites if s["kind"] == "key"]
            transforms = sorted({s["key_transform"] for s in keys if s["key_transform"]})
            model.metadata_props[KV_CACHE_KEY] = json.dumps({
                "bits": self.bits, "group_size": group_size, "head_dim": head_dim,
                "symmetric": self.symmetric, "sink_tokens": self.sink_tokens,
                "key_rotation": self.key_rotation, "head_group": self.head_group,
                "key_reorder": self.key_order is not None, "layout": "append",
                "scale_dtype": "float16", "kinds": list(self.kinds),
                "layers": None if self.layers is None else sorted(self.layers),
                "key_placement": self.key_placement if keys else None,
                "key_transform": transforms[0] if len(transforms) == 1 else (transforms or None),
                "rope_reapplied": any(s.get("rope") for s in keys),
                "rope_positions": POSITION_RULE if any(s.get("rope") for s in keys) else None,
                "quantized": self.quantize,
                "sites": [f"{s['layer']}.{s['kind']}" for s in result.sites],
            }, sort_keys=True)
        return result

    # -------------------------------------------------------------- fold
    @staticmethod
    def _fold(fold: _Fold, transform: _KeyTransform) -> None:
        """``W ← W · M`` and ``b ← b · M`` on ``k_proj`` (new initializers when shared)."""
        m = transform.matrix()
        for value, user in ((fold.weight, fold.matmul), (fold.bias, fold.add)):
            if value is None or user is None:
                continue
            array = const_array(value)
            folded = (array.astype(np.float64) @ m).astype(array.dtype).reshape(array.shape)
            if len(value.uses()) == 1:
                value.const_value = ir.tensor(folded, name=value.name)
                continue
            name = f"{value.name}.rotatekv"
            copy = ir.Value(name=name, shape=ir.Shape(folded.shape), type=ir.TensorType(value.dtype),
                            const_value=ir.tensor(folded, name=name))
            user.graph.register_initializer(copy)
            user.replace_input_with(list(user.inputs).index(value), copy)

    # -------------------------------------------------------------- rewrite
    def _rewrite(self, graph: ir.Graph, layer: int, kind: str, past: ir.Value, concat: ir.Node,
                 new: ir.Value, heads: int, d: int, g: int, transform: _KeyTransform | None,
                 path: _KeyPath | None, cloner: _RopeCloner) -> None:
        bits, n_groups = self.bits, d // g
        per_byte = 8 // bits
        packed = d // per_byte
        qmax = float(2**bits - 1)
        base = f"past_key_values.{layer}.{kind}"
        out_base = f"present.{layer}.{kind}"
        module = concat.metadata_props.get("onnxq.module", f"layer{layer}")
        b = _Builder(graph, f"kvq.{layer}.{kind}", type(self).__name__, module)
        present = concat.outputs[0]
        exact = not self.quantize

        # new graph inputs
        past_dim = "quantized_sequence" if self.sink_tokens else "past_sequence"
        f16 = ir.TensorType(ir.DataType.FLOAT16)
        f32 = ir.TensorType(ir.DataType.FLOAT)
        side = f32 if exact else f16

        def gin(name, dtype, last, seq=past_dim):
            return ir.Value(name=name, type=dtype, shape=ir.Shape(["batch", heads, seq, last]))

        if exact:
            q_in, s_in, z_in = gin(base, f32, d), None, None
        else:
            q_in = gin(base, ir.TensorType(ir.DataType.UINT8), packed)
            s_in = gin(f"{base}_scale", f16, n_groups)
            z_in = None if self.symmetric else gin(f"{base}_zero", f16, n_groups)
        sink_in = gin(f"{base}_sink", side, d, "sink_sequence") if self.sink_tokens else None
        new_inputs = [v for v in (q_in, s_in, z_in, sink_in) if v is not None]
        pos = list(graph.inputs).index(past)
        graph.inputs.pop(pos)
        for offset, value in enumerate(new_inputs):
            graph.inputs.insert(pos + offset, value)

        # ---- read: unpack + dequantize the past (in the stored domain)
        write = b
        b = _Builder(graph, f"kvq.{layer}.{kind}.read", type(self).__name__, module)
        read = b
        lead0 = [0, 0, 0]
        if exact:
            deq = q_in
        else:
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
        if transform is not None and path is None:  # post-RoPE: the past goes back at once
            deq = _apply_transform(b, deq, transform, heads, d, inverse=True, hint="unrotated")
        if self.sink_tokens:
            sink_f = sink_in if exact else b.op("Cast", [sink_in], {"to": ir.DataType.FLOAT})
            deq = b.op("Concat", [sink_f, deq], {"axis": 2}, hint="past")
        # deq has the shape of the FP past: every other reader (Shape) gets it too
        deq.shape = past.shape
        deq.type = past.type
        b = write

        # ---- the rows this run stores: post-RoPE new rows, or the pre-RoPE keys · M
        stored = new
        if path is not None:
            stored = path.x
            if transform is not None and path.fold is None:
                stored = _apply_transform(b, stored, transform, heads, d, inverse=False, hint="rotated")

        # ---- split the new rows between the sink cache and the quantized cache
        to_quant = stored
        sink_out = None
        if self.sink_tokens:
            seq_new = b.op("Shape", [stored], {"start": 2, "end": 3})
            seq_sink = b.op("Shape", [sink_in], {"start": 2, "end": 3})
            room = b.op("Sub", [b.i64("n_sink", [self.sink_tokens]), seq_sink])
            n_s = b.op("Max", [b.op("Min", [seq_new, room]), b.i64("zero", [0])])
            axis2 = b.i64("axis2", [2])
            head = b.op("Slice", [stored, b.i64("zero", [0]), n_s, axis2])
            to_quant = b.op("Slice", [stored, n_s, b.i64("end", [2**62]), axis2])
            sink_out = ir.Value(name=f"{out_base}_sink", type=side,
                                shape=ir.Shape(["batch", heads, "sink_new", d]))
            if exact:
                b.op("Identity", [head], out=sink_out)
            else:
                b.op("Cast", [head], {"to": ir.DataType.FLOAT16}, out=sink_out)

        # ---- write: quantize + pack the new (non-sink) rows
        x = to_quant
        if transform is not None and path is None:
            x = _apply_transform(b, x, transform, heads, d, inverse=False, hint="rotated")
        s_out = z_out = None
        if exact:
            q_out = ir.Value(name=out_base, type=f32, shape=ir.Shape(["batch", heads, "quantized_new", d]))
            b.op("Identity", [x], out=q_out)
        else:
            q_out, s_out, z_out = self._quantize(b, x, out_base, heads, d, g)

        # ---- attention input: sink + dequantized past + exact new rows
        if path is None:
            full = b.op("Concat", [deq, new], {"axis": 2}, hint="attention_cache")
        else:
            full = b.op("Concat", [deq, stored], {"axis": 2}, hint="cache_pre_rope")
            if transform is not None:
                full = _apply_transform(b, full, transform, heads, d, inverse=True, hint="unrotated")
            if path.rope:
                cloner.all_positions(deq)  # created once, from the first layer's cache length
                full = cloner.rope(path, new, full)
        full.shape = present.shape
        full.type = present.type
        if path is not None and path.rope:
            # RoPE for all cache positions: positions -> cos/sin copies -> RoPE copies
            b.nodes.extend(cloner.b.nodes)
            cloner.b.nodes.clear()
        graph.insert_before(concat, b.nodes)
        graph.insert_before(next(iter(graph)), read.nodes)
        out_pos = list(graph.outputs).index(present)
        graph.outputs.pop(out_pos)
        present.replace_all_uses_with(full)
        graph.remove(concat, safe=True)
        past.replace_all_uses_with(deq)
        for offset, value in enumerate(v for v in (q_out, s_out, z_out, sink_out) if v is not None):
            graph.outputs.insert(out_pos + offset, value)
        if path is not None:  # the layer's own RoPE on the new keys is dead now
            for node in reversed(path.rope):
                if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                    graph.remove(node, safe=True)

    def _quantize(self, b: _Builder, x: ir.Value, out_base: str, heads: int, d: int,
                  g: int) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """Per-token, per-group min/max (or symmetric) codes of ``x``, packed to uint8."""
        bits, n_groups = self.bits, d // g
        per_byte = 8 // bits
        packed = d // per_byte
        qmax = float(2**bits - 1)
        lead0 = [0, 0, 0]
        f16 = ir.TensorType(ir.DataType.FLOAT16)
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
        return q_out, s_out, z_out


# ------------------------------------------------------------------ recipe
def apply_rotatekv(model: ir.Model, *, bits: int = 2, group_size: int | None = None,
                   rotate_values: bool = True, key_rotation: str | None = "grouped",
                   head_group: int = 4, reorder: bool = True,
                   calibration: Iterable[np.ndarray] | None = None, reorder_statistic: str = "sum",
                   sink_tokens: int = 1, symmetric: bool = False,
                   seed: int | None = None, key_placement: str | None = None,
                   kinds: Sequence[str] = ("key", "value"), layers: Iterable[int] | None = None) -> KVCacheResult:
    """The RotateKV recipe with every piece switchable (in place on ``model``).

    1. ``rotate_values``: per-head Hadamard folded into ``v_proj``/``o_proj``
       (``OnlineHadamardPass(targets="attention_out")``);
    2. ``key_rotation``: Hadamard over ``head_group`` KV heads on the keys;
    3. ``reorder``: channel order from the keys of ``calibration`` (token-id arrays),
       signed per-channel sum of the rotated keys, ascending;
    4. ``key_placement``: ``"pre_rope"`` (RotateKV: rotation and reorder folded into
       ``k_proj``, pre-RoPE cache, RoPE re-applied to the cache) or ``"post_rope"``
       (online on the post-RoPE keys); None = ``"pre_rope"`` when 2. or 3. is on;
    5. ``sink_tokens``: first positions in an FP16 side cache;
    6. ``bits``-bit per-token, per-group cache (:class:`QuantizeKVCachePass`; ``kinds``
       and ``layers`` restrict it, e.g. for an error breakdown).
    """
    placement = _resolve_placement(key_placement, key_rotation is not None or reorder)
    if rotate_values:
        from onnxq.passes.online_hadamard import OnlineHadamardPass

        OnlineHadamardPass(targets="attention_out", seed=seed, head_dim=_meta(model, "onnxq.head_dim"))(model)
    order = None
    if reorder:
        if calibration is None:
            raise ValueError("reorder=True needs calibration token ids")
        samples = collect_key_samples(model, calibration, key_placement=placement)
        heads = _meta(model, "onnxq.num_kv_heads")
        d = _meta(model, "onnxq.head_dim")
        if heads is None or d is None:
            x = next(iter(samples.values()))
            raise ValueError(f"the model has no onnxq.num_kv_heads/head_dim metadata ({x.shape[1]} key channels)")
        r = key_rotation_matrix(heads, d, mode=key_rotation, head_group=head_group, seed=seed)
        order = key_order_from_samples(samples, r, statistic=reorder_statistic)
    return QuantizeKVCachePass(bits=bits, group_size=group_size, symmetric=symmetric, sink_tokens=sink_tokens,
                               key_rotation=key_rotation, head_group=head_group, key_order=order,
                               seed=seed, key_placement=placement, kinds=kinds, layers=layers)(model)


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
                      sink_tokens: int = 1, key_placement: str | None = None) -> KVCacheResult:
    """What ``--kv-bits`` does: the RotateKV recipe (or plain min/max with ``rotatekv=False``).

    Keys are rotated and reordered pre-RoPE (folded into ``k_proj`` where possible) unless
    ``key_placement="post_rope"``.  Without ``calibration`` the key reordering is
    calibrated on :func:`random_calibration`.
    """
    if model.metadata_props.get("onnxq.task") not in (None, "text-generation"):
        raise ValueError("--kv-bits applies to text-generation (decoder) models only")
    if not rotatekv:
        return QuantizeKVCachePass(bits=bits, group_size=group_size, sink_tokens=sink_tokens,
                                   key_placement=key_placement)(model)
    if calibration is None:
        calibration = random_calibration(model)
    return apply_rotatekv(model, bits=bits, group_size=group_size, calibration=calibration,
                          sink_tokens=sink_tokens, key_placement=key_placement)
