"""QuantizedBiasGemmPass: structure, numerics (onnxruntime, optimizations off and on), contract."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.calibration.runner import calibrate
from onnxq.passes.bias_gemm import QuantizedBiasGemmPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.targets.profiles import get_target
from onnxq.testing import op_counts, run, to_proto

H = 16


def _projections_model() -> ir.Model:
    """``x [batch, seq, 16]`` read by three biased linears: one viewed to heads by a
    Reshape (like Q/K/V), one transposed, one followed by Gelu (bias absorbed by
    onnxruntime's BiasGelu, so left alone)."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", H])
    inits: list[ir.Value] = []
    nodes: list[ir.Node] = []

    def const(name, arr):
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        return v

    def op(kind, inputs, name, attrs=None, module="", shape=("batch", "seq", H)):
        out = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        nodes.append(ir.node(kind, inputs, attrs, outputs=[out], name=f"node_{name}",
                             metadata_props={"onnxq.module": module} if module else None))
        return out

    def linear(name, inp):
        w = (rng.standard_normal((H, H)) / 4).astype(np.float32)
        b = (0.5 + rng.standard_normal(H)).astype(np.float32)  # a large bias on purpose
        mm = op("MatMul", [inp, const(f"{name}.weight", w)], f"{name}_mm", module=name)
        return op("Add", [mm, const(f"{name}.bias", b)], f"{name}_out")

    q = linear("query", x)
    heads = op("Reshape", [q, const("heads_shape", np.array([-1, 5, 4, 4], np.int64))], "heads",
               shape=("batch", 5, 4, 4))
    k = linear("key", x)
    kt = op("Transpose", [k], "key_t", {"perm": [0, 2, 1]}, shape=("batch", H, "seq"))
    f = linear("fc", x)
    g = op("Gelu", [f], "gelu")
    graph = ir.Graph([x], [heads, kt, g], nodes=nodes, initializers=inits,
                     opset_imports={"": 21}, name="projections")
    return ir.Model(graph, ir_version=10)


def _feeds(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": (2.0 * rng.standard_normal((2, 5, H))).astype(np.float32)} for _ in range(n)]


def _quantized(lower: bool) -> ir.Model:
    model = _projections_model()
    stats = calibrate(model, _feeds())
    target = dataclasses.replace(get_target("ort-cpu"), lower_bias_gemm=lower)
    InsertQDQPass(stats=stats, target=target, method="minmax")(model)
    return model


def _ort(model: ir.Model, feeds, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_structure_only_layout_fed_biases_become_gemm():
    model = _quantized(lower=True)
    counts = op_counts(model)
    assert counts["Gemm"] == 2 and counts["MatMul"] == 1, counts
    assert counts["Add"] == 1  # the Gelu-side bias stays for BiasGelu
    for node in model.graph:
        if node.op_type != "Gemm":
            continue
        a, w, b = (v.producer() for v in node.inputs)
        assert a.op_type == w.op_type == b.op_type == "DequantizeLinear"
        assert b.inputs[0].const_value.numpy().dtype == np.int32
        assert w.inputs[0].const_value.numpy().dtype == np.int8
        assert len(a.inputs[0].producer().inputs[0].shape) == 2  # rows of x
    # one shared 2-D quantization of x for both lowered linears
    row_q = [n for n in model.graph if n.op_type == "QuantizeLinear"
             and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Reshape"]
    assert len(row_q) == 1
    # the transposed output gets its [batch, seq, N] shape back; the viewed one needs none
    assert model.graph.node("node_key_t").inputs[0].producer().op_type == "Reshape"
    assert model.graph.node("node_heads").inputs[0].producer().op_type == "Gemm"
    assert model.graph.node("node_key_t").inputs[0].name == "key_out"
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_tensorrt_graph_has_no_gemm():
    model = _projections_model()
    stats = calibrate(model, _feeds())
    InsertQDQPass(stats=stats, target=get_target("tensorrt"), method="minmax")(model)
    assert op_counts(model)["Gemm"] == 0


def test_numerics_match_the_unlowered_qdq_graph():
    lowered, plain = _quantized(lower=True), _quantized(lower=False)
    feeds = _feeds(1, seed=7)[0]
    got = _ort(lowered, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    want = run(plain, feeds)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        # only the int32 bias rounding differs: at most s_x * s_w / 2 per channel
        np.testing.assert_allclose(g, w, atol=2e-3, rtol=0)


def test_onnxruntime_fuses_qgemm_with_the_bias():
    lowered, plain = _quantized(lower=True), _quantized(lower=False)
    feeds = _feeds(1, seed=3)[0]
    # Both on onnxruntime's integer kernels (QGemm vs MatMulIntegerToFloat + Add). Not
    # against the float DQ reference: on x86 without VNNI, u8s8 kernels saturate int16
    # pair sums (VPMADDUBSW), which this test's full-range int8 weights trigger in
    # both graphs alike.
    fused = _ort(lowered, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    ref = _ort(plain, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for f, r in zip(fused, ref, strict=True):
        np.testing.assert_allclose(f, r, atol=2e-3, rtol=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = f"{d}/opt.onnx"
        ort.InferenceSession(to_proto(lowered).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(f"{d}/opt.onnx").graph.node]
    assert ops.count("QGemm") == 2 and "Gemm" not in ops and "DequantizeLinear" not in ops


def test_contract_idempotent_and_untouched_when_nothing_matches():
    model = _quantized(lower=True)
    before = to_proto(model).SerializeToString()
    again = QuantizedBiasGemmPass()(model)
    assert not again.modified and again.lowered == []
    assert to_proto(model).SerializeToString() == before
    fp = _projections_model()  # float graph: no DQ -> MatMul units
    before = to_proto(fp).SerializeToString()
    res = QuantizedBiasGemmPass()(fp)
    assert not res.modified
    assert to_proto(fp).SerializeToString() == before


def test_result_names_the_lowered_linears():
    model = _projections_model()
    stats = calibrate(model, _feeds())
    target = dataclasses.replace(get_target("ort-cpu"), lower_bias_gemm=False)
    InsertQDQPass(stats=stats, target=target, method="minmax")(model)
    res = QuantizedBiasGemmPass()(model)
    assert res.modified and sorted(res.lowered) == ["key", "query"]


def test_untyped_intermediate_values_serialize():
    """Graphs from onnx.helper often carry no value_info for intermediate tensors."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        inits += [numpy_helper.from_array((rng.standard_normal((H, H)) / 4).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}")]
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", H])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.from_proto(proto)
    stats = calibrate(model, _feeds())
    InsertQDQPass(stats=stats, target=get_target("ort-cpu"), method="minmax")(model)
    assert op_counts(model)["Gemm"] == 1  # y0 feeds only the next QuantizeLinear
    out = to_proto(model)
    onnx.checker.check_model(out)
    plain = ir.from_proto(proto)
    InsertQDQPass(stats=stats, target=dataclasses.replace(get_target("ort-cpu"),
                                                          lower_bias_gemm=False),
                  method="minmax")(plain)
    feeds = _feeds(1, seed=5)[0]
    got = _ort(model, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    want = run(plain, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
