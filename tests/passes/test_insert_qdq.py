"""InsertQDQPass: structure, numerics against a numpy fake-quant reference, contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.calibration.runner import calibrate
from onnxq.calibration.stats import Stats
from onnxq.errors import StatsMismatchError
from onnxq.passes.insert_qdq import InsertQDQPass, quantize_weight_per_channel
from onnxq.targets.profiles import get_target
from onnxq.testing import encoder_block_model, op_counts, run, to_proto


def _feeds(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 5, 16)).astype(np.float32)} for _ in range(n)]


def _quantized(target="tensorrt", **kw):
    model = encoder_block_model()
    stats = calibrate(model, _feeds())
    res = InsertQDQPass(stats=stats, target=get_target(target), method="minmax", **kw)(model)
    return model, stats, res


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu", "jetson"])
def test_structure_every_linear_reads_dequantize(target):
    model, _, res = _quantized(target)
    counts = op_counts(model)
    assert counts["QuantizeLinear"] == 2  # fc1 and fc2 inputs
    assert counts["DequantizeLinear"] == 4  # two activations, two weights
    for node in model.graph:
        if node.op_type == "MatMul":
            assert all(i.producer() is not None and i.producer().op_type == "DequantizeLinear"
                       for i in node.inputs)
        if node.op_type in ("LayerNormalization", "Gelu"):
            assert all(i.producer() is None or i.producer().op_type != "DequantizeLinear"
                       for i in node.inputs)
    zp_type = np.int8 if target != "ort-cpu" else np.uint8
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            assert node.inputs[2].const_value.numpy().dtype == zp_type
    # float weights are gone; int8 ones replace them
    assert "fc1.weight" not in model.graph.initializers
    assert model.graph.initializers["fc1.weight_quantized"].const_value.numpy().dtype == np.int8
    onnx.checker.check_model(to_proto(model), full_check=True)
    assert {a.module for a in res.activations} == {"fc1", "fc2"}


def _fake_quant(x, scale, zp, qmin, qmax):
    return (np.clip(np.rint(x / scale) + zp, qmin, qmax) - zp) * scale


def test_numerics_match_numpy_fake_quant_reference():
    ref_model = encoder_block_model()
    model, stats, res = _quantized("tensorrt")
    feeds = _feeds(seed=5, n=1)[0]
    (got,) = run(model, feeds)
    # numpy reference of the same block with the same scales
    init = {k: v.const_value.numpy() for k, v in ref_model.graph.initializers.items()}
    x = feeds["x"].astype(np.float64)

    def ln(v, g, b):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * g + b

    import math

    erf = np.vectorize(math.erf)

    acts = {a.module: a for a in res.activations}

    def qlin(v, name, module):
        a = acts[module]
        vq = _fake_quant(v, a.scale, a.zero_point, -128, 127)
        wq, ws = quantize_weight_per_channel(init[f"{name}.weight"])
        return vq @ (wq.astype(np.float64) * ws) + init[f"{name}.bias"]

    h = ln(x, init["ln1.weight"], init["ln1.bias"])
    f1 = qlin(h, "fc1", "fc1")
    g = 0.5 * f1 * (1 + erf(f1 / np.sqrt(2)))
    f2 = qlin(g, "fc2", "fc2")
    want = ln(f2 + h, init["ln2.weight"], init["ln2.bias"])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    # and the quantized model is close to but not identical with FP32
    (fp,) = run(ref_model, feeds)
    assert not np.array_equal(got, fp)
    assert np.abs(got - fp).max() < 0.5


def test_weight_quantization_is_symmetric_per_output_channel():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w[:, 2] = 0.0
    wq, s = quantize_weight_per_channel(w)
    assert wq.dtype == np.int8 and s.shape == (4,)
    assert np.all(s > 0)
    assert np.abs(wq).max() <= 127
    np.testing.assert_allclose(wq * s, w, atol=s.max() / 2 + 1e-7)


def test_contract_keep_fp_and_no_match():
    model, _, res = _quantized("tensorrt", keep_fp=["fc2"])
    assert res.modified
    assert res.kept_fp == ["fc2"]
    assert op_counts(model)["QuantizeLinear"] == 1
    # a graph with no MatMul is untouched and reports no change
    plain = encoder_block_model()
    stats = calibrate(plain, _feeds())
    everything_fp = InsertQDQPass(stats=stats, target=get_target("tensorrt"),
                                  keep_fp=["fc1", "fc2"])
    before = to_proto(encoder_block_model()).SerializeToString(deterministic=True)
    r = everything_fp(plain)
    assert not r.modified
    assert to_proto(plain).SerializeToString(deterministic=True) == before


def test_refuses_stats_of_another_graph():
    model = encoder_block_model()
    stats = calibrate(encoder_block_model(seed=1), _feeds())
    with pytest.raises(Exception) as info:
        InsertQDQPass(stats=stats, target=get_target("tensorrt"))(model)
    assert isinstance(info.value, StatsMismatchError) or isinstance(
        info.value.__cause__, StatsMismatchError)


def test_second_run_needs_new_stats_and_changes_nothing_else():
    model, stats, _ = _quantized("tensorrt")
    # the quantized graph has a different fingerprint: stats no longer apply
    with pytest.raises(Exception):
        InsertQDQPass(stats=stats, target=get_target("tensorrt"))(model)


def test_stats_file_roundtrip_drives_same_quantization(tmp_path):
    model = encoder_block_model()
    stats = calibrate(model, _feeds())
    stats.save(tmp_path / "s.npz")
    loaded = Stats.load(tmp_path / "s.npz")
    a, b = encoder_block_model(), encoder_block_model()
    InsertQDQPass(stats=stats, target=get_target("tensorrt"))(a)
    InsertQDQPass(stats=loaded, target=get_target("tensorrt"))(b)
    assert to_proto(a).SerializeToString(deterministic=True) == to_proto(b).SerializeToString(
        deterministic=True)


def test_int4_blocked_weights_structure_numerics_and_lint():
    import ml_dtypes

    from onnxq.passes.insert_qdq import quantize_weight_blocked_int4
    from onnxq.targets.lint import lint

    ref_model = encoder_block_model(hidden=64, ffn=128)
    model = encoder_block_model(hidden=64, ffn=128)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 5, 64)).astype(np.float32)} for _ in range(3)]
    stats = calibrate(model, feeds)
    InsertQDQPass(stats=stats, target=get_target("tensorrt"), weight_bits=4, block_size=64)(model)
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"
           and n.inputs[0].const_value is not None]
    assert len(dqs) == 2
    for dq in dqs:
        assert dq.attributes.get_int("block_size") == 64 and dq.attributes.get_int("axis") == 0
        assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
    assert lint(model, "tensorrt") == []
    assert [v.rule for v in lint(model, "jetson")].count("int4-block") == 2
    # the graph computes with exactly the dequantized int4 weights
    w = ref_model.graph.initializers["fc1.weight"].const_value.numpy()
    q, s = quantize_weight_blocked_int4(w, 64)
    deq = dqs[0].inputs[0].const_value.numpy().astype(np.int8).astype(np.float32)
    np.testing.assert_array_equal(deq, q.astype(np.float32))
    assert np.abs(q * np.repeat(s, 64, axis=0) - w).max() <= np.repeat(s, 64, axis=0).max() / 2 + 1e-6
    (got,) = run(model, feeds[0])
    (fp,) = run(ref_model, feeds[0])
    assert np.abs(got - fp).max() < 1.0
    assert ml_dtypes is not None


def test_int4_refused_where_target_cannot_run_it():
    model = encoder_block_model()
    stats = calibrate(model, _feeds())
    with pytest.raises(Exception) as info:
        InsertQDQPass(stats=stats, target=get_target("jetson"), weight_bits=4)(model)
    assert "int4" in str(info.value) or "int4" in str(info.value.__cause__)
