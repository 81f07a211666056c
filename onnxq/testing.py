"""Helpers for tests and benchmarks: run graphs, compare outputs, build small graphs.

Nothing here is needed at run time by ``onnxq convert``.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

__all__ = [
    "encoder_block_model",
    "op_counts",
    "random_feeds",
    "run",
    "to_proto",
]


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model)


def run(
    model: ir.Model | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    optimize: bool = False,
    outputs: list[str] | None = None,
) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime CPU (graph optimisations off unless ``optimize``)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in sess.get_inputs()}
    return sess.run(outputs, {k: v for k, v in feeds.items() if k in names})


def op_counts(model: ir.Model | onnx.ModelProto) -> collections.Counter:
    if isinstance(model, onnx.ModelProto):
        return collections.Counter(n.op_type for n in model.graph.node)
    return collections.Counter(n.op_type for n in model.graph)


def random_feeds(model: ir.Model, *, batch: int = 2, seq: int = 8, seed: int = 0,
                 vocab: int = 100) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dims: batch then seq)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        dims = []
        for i, d in enumerate(v.shape or []):
            dims.append(d if isinstance(d, int) else (batch if i == 0 else seq))
        dt = v.dtype.numpy() if v.dtype is not None else np.float32
        if v.name == "attention_mask":
            arr = np.ones(dims, dtype=dt)
            if len(dims) == 2 and dims[1] > 2:
                arr[-1, -2:] = 0
        elif np.issubdtype(dt, np.integer):
            arr = (rng.integers(0, 2, size=dims) if "type" in v.name
                   else rng.integers(0, vocab, size=dims)).astype(dt)
        else:
            arr = rng.standard_normal(dims).astype(dt)
        feeds[v.name] = arr
    return feeds


def encoder_block_model(
    *,
    hidden: int = 16,
    ffn: int = 32,
    seed: int = 0,
    outlier_channel: int | None = 3,
    post_ln: bool = True,
    rms: bool = False,
    bias: bool = True,
    opset: int = 21,
) -> ir.Model:
    """A one-block transformer FFN graph built in code, with a planted outlier channel.

    ``x -> LN -> (fc1 -> Gelu -> fc2) + residual -> LN`` (post-LN, BERT) or
    ``x + fc2(Gelu(fc1(LN(x))))`` (pre-LN). Input ``x`` is ``[batch, seq, hidden]``.
    The LayerNorm's γ/β make one channel large and asymmetric, as in BERT.
    """
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    if outlier_channel is not None:
        gamma[outlier_channel] = 12.0
        beta[outlier_channel] = 6.0 if not rms else 0.0
    w1 = (rng.standard_normal((hidden, ffn)) / np.sqrt(hidden)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(ffn)).astype(np.float32)
    w2 = (rng.standard_normal((ffn, hidden)) / np.sqrt(ffn)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)

    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", hidden])
    inits: list[ir.Value] = []

    def const(name: str, arr: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        return v

    nodes: list[ir.Node] = []

    def add(op, inputs, name, attrs=None, module="", width=hidden):
        out = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(["batch", "seq", width]))
        nodes.append(ir.node(op, inputs, attrs, outputs=[out], name=f"node_{name}",
                             metadata_props={"onnxq.module": module} if module else None))
        return out

    def norm(inp, name, g, b):
        if rms:
            return add("RMSNormalization", [inp, const(f"{name}.weight", g)], name,
                       {"axis": -1, "epsilon": 1e-6}, module=name)
        return add("LayerNormalization", [inp, const(f"{name}.weight", g),
                                          const(f"{name}.bias", b)], name,
                   {"axis": -1, "epsilon": 1e-5}, module=name)

    h = norm(x, "ln1", gamma, beta)
    m1 = add("MatMul", [h, const("fc1.weight", w1)], "fc1_mm", module="fc1", width=ffn)
    a1 = add("Add", [m1, const("fc1.bias", b1)], "fc1_out", width=ffn) if bias else m1
    g = add("Gelu", [a1], "gelu", width=ffn)
    m2 = add("MatMul", [g, const("fc2.weight", w2)], "fc2_mm", module="fc2")
    a2 = add("Add", [m2, const("fc2.bias", b2)], "fc2_out") if bias else m2
    if post_ln:
        r = add("Add", [a2, h], "residual")
        y = norm(r, "ln2", np.ones(hidden, np.float32), np.zeros(hidden, np.float32))
    else:
        y = add("Add", [a2, x], "residual")
    y.name = "y"
    y.dtype = ir.DataType.FLOAT
    y.shape = ir.Shape(["batch", "seq", hidden])
    graph = ir.Graph([x], [y], nodes=nodes, initializers=inits,
                     opset_imports={"": max(opset, 23) if rms else opset}, name="block")
    return ir.Model(graph, ir_version=10)
