"""What onnxruntime CPU makes of an `--target ort-cpu` graph: STRUCTURE only, no timing.

The speed of the ort-cpu output rests on onnxruntime fusing every Q/DQ node unit
(deploy-rules.md D2): after its graph optimisations no MatMul may be left in
float, no DequantizeLinear may survive, and the FP32 fusions (SkipLayerNormalization,
BiasGelu) must still happen. The default outlier passes for this target must not
add run-time data movement (PEG's Gather/Sum splits).
"""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq.pipeline import _expand
from onnxq.recipe import Recipe


def _optimized_ops(path, tmp_path, name):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    out = tmp_path / f"{name}.opt.onnx"
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from onnxq.zoo.bert import tiny_bert_onnx

    d = tmp_path_factory.mktemp("speed")
    src = tiny_bert_onnx(d / "bert")
    fp32 = d / "fp32.onnx"
    model, _ = onnxq.load_source(src)
    onnxq.prepare(model)
    onnxq.save(model, fp32)
    q = d / "int8.onnx"
    onnxq.convert(src, q, recipe=Recipe(target="ort-cpu", samples=32, batch_size=8,
                                        validate_samples=0))
    return d, fp32, q


def test_no_float_matmul_and_no_dequantize_left(graphs, tmp_path):
    _, _, q = graphs
    ops = _optimized_ops(q, tmp_path, "int8")
    assert ops["MatMul"] == 0 and ops["FusedMatMul"] == 0 and ops["Gemm"] == 0, ops
    assert ops["DequantizeLinear"] == 0, ops
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] > 0, ops


def test_fp32_fusions_survive_quantization(graphs, tmp_path):
    _, fp32, q = graphs
    ref = _optimized_ops(fp32, tmp_path, "fp32")
    ops = _optimized_ops(q, tmp_path, "int8")
    for fused in ("SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu", "Attention"):
        assert ops[fused] == ref[fused], (fused, ref, ops)
    assert ref["SkipLayerNormalization"] > 0


def test_default_outlier_passes_add_no_data_movement(graphs, tmp_path):
    _, fp32, q = graphs
    ref = _optimized_ops(fp32, tmp_path, "fp32")
    ops = _optimized_ops(q, tmp_path, "int8")
    # PEG's Gather -> K MatMuls -> Sum splits are not in the ort-cpu default; the int8
    # embedding tables add their own Gathers only where the FP32 graph has one.
    assert ops["Sum"] == 0, ops
    assert ops["Gather"] <= ref["Gather"] + 2, (ref, ops)


def test_auto_outliers_per_target():
    assert _expand(("auto",), "ort-cpu") == ["osplus"]
    assert _expand(("auto",), "tensorrt") == ["osplus", "peg"]
    assert _expand(("auto",)) == ["osplus", "peg"]
    assert _expand(("auto", "peg"), "ort-cpu") == ["osplus", "peg"]


def _attention_model(scale=0.125):
    import numpy as np
    import onnx_ir as ir

    q = ir.Value(name="q", shape=ir.Shape([2, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    kt = ir.Value(name="kt", shape=ir.Shape([2, 8, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    v = ir.Value(name="v", shape=ir.Shape([2, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    c = ir.Value(name="c", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.array(scale, np.float32), name="c"))
    s = ir.node("MatMul", [q, kt], name="qk")
    m = ir.node("Mul", [s.outputs[0], c], name="scale")
    sm = ir.node("Softmax", [m.outputs[0]], attributes={"axis": -1}, name="softmax")
    pv = ir.node("MatMul", [sm.outputs[0], v], name="pv")
    m.outputs[0].name, sm.outputs[0].name, s.outputs[0].name = "scores", "probs", "qk_out"
    pv.outputs[0].name = "out"
    graph = ir.Graph([q, kt, v], [pv.outputs[0]], nodes=[s, m, sm, pv], initializers=[c],
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_attention_scale_folded_into_k_dequantize_for_ort_cpu_only(target):
    import numpy as np

    from onnxq.calibration.runner import calibrate
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.targets.profiles import get_target
    from onnxq.testing import op_counts, run

    rng = np.random.default_rng(0)
    feeds = [{n: rng.standard_normal(s).astype(np.float32)
              for n, s in (("q", (2, 4, 8)), ("kt", (2, 8, 4)), ("v", (2, 4, 8)))}
             for _ in range(3)]
    model = _attention_model()
    stats = calibrate(model, feeds)
    InsertQDQPass(stats=stats, target=get_target(target), method="minmax")(model)
    counts = op_counts(model)
    folded = target == "ort-cpu"
    assert counts["Mul"] == (0 if folded else 1)
    assert counts["QuantizeLinear"] == 4 and counts["DequantizeLinear"] == 4
    if folded:
        sm = next(n for n in model.graph if n.op_type == "Softmax")
        assert sm.inputs[0].producer().op_type == "MatMul"
    # same result as the unfolded fake-quant graph
    ref = _attention_model()
    InsertQDQPass(stats=stats, target=get_target(target).__class__(
        **{**get_target(target).__dict__, "fold_attention_scale": False}), method="minmax")(ref)
    (got,) = run(model, feeds[0])
    (want,) = run(ref, feeds[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
