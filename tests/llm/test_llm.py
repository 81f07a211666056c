"""Static W8A8 for decoders (onnxq.llm) on tiny LLaMA (GQA) / Qwen2 / OPT with planted outliers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.llm import convert_decoder, lower_opset, upgrade_opset
from onnxq.passes.decompose_rms_norm import DecomposeRMSNormPass
from onnxq.passes.fuse_rms_norm import FuseRMSNormPass
from onnxq.recipe import Recipe
from onnxq.runtime import DecoderSession, generate, teacher_forced_logits
from onnxq.targets.lint import lint

KINDS = ("llama", "qwen2", "opt")
# small calibration so the whole file stays fast
FAST = dict(samples=32, seq_len=64, batch_size=8)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, bytes]:
    from onnxq.zoo.decoders import tiny_decoder_onnx

    out = {}
    for kind in KINDS:
        path = tiny_decoder_onnx(kind, tmp_path_factory.mktemp(kind))
        out[kind] = path
    return out


def _load(decoders, kind) -> ir.Model:
    return ir.load(decoders[kind])


# ----------------------------------------------------------------------- rotations


@pytest.mark.parametrize("kind", KINDS)
def test_rotations_keep_logits_prefill_and_16_decode_steps(decoders, kind):
    from onnxq._api import prepare
    from onnxq.passes.online_hadamard import OnlineHadamardPass
    from onnxq.passes.rotate_residual import RotateResidualPass

    model = _load(decoders, kind)
    assert upgrade_opset(model, layernorm=True) == 21
    prepare(model)
    assert model.opset_imports[""] == 23
    if kind != "opt":
        assert any(n.op_type == "RMSNormalization" for n in model.graph)
    ref = ir.serde.serialize_model(model).SerializeToString()
    done = []
    for p in (RotateResidualPass(seed=0), OnlineHadamardPass(targets="down_proj", seed=0),
              OnlineHadamardPass(targets="attention_out", seed=0)):
        done.append(p(model).modified)
    assert done[1] and done[2]
    if kind != "opt":  # OPT's residual stream is read by a Reshape: R1 refuses it
        assert done[0]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, size=(2, 8 + 16))
    ids[:, 0] = 1  # BOS: the massive activations
    a = teacher_forced_logits(DecoderSession(ref, optimize=False), ids, 8)
    b = teacher_forced_logits(DecoderSession(model, optimize=False), ids, 8)
    assert a.shape == (2, 17, 256)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= 1e-4, rel


# ----------------------------------------------------------------------- W8A8


@pytest.fixture(scope="module")
def converted(decoders):
    results = {}
    for kind in KINDS:
        for target in ("tensorrt", "ort-cpu"):
            results[kind, target] = convert_decoder(
                _load(decoders, kind), recipe=Recipe(target=target, **FAST))
    return results


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_w8a8_cosine_and_lint(converted, kind, target):
    res = converted[kind, target]
    fid = res.fidelity
    assert fid.output == "logits"
    assert fid.samples == 8 * 33  # 8 held-out sequences x (prefill + 32 decode steps)
    assert fid.mean_cosine >= 0.99, fid
    assert lint(res.model, target) == []
    assert res.report["lint"] == []
    ops = {n.op_type for n in res.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert res.report["coverage"]["fraction"] > 0.9
    dec = res.report["decoder"]
    assert dec["calibration"]["decode_step_feeds"] > 0
    assert dec["validation"]["decode_steps"] == 32


def test_greedy_generate_with_int8_graph(converted):
    model = converted["llama", "tensorrt"].model
    prompt = np.array([[1, 40, 41, 42, 43]], np.int64)
    out = generate(DecoderSession(model), prompt, 8)
    assert out.shape == (1, 13)
    assert (out[:, :5] == prompt).all()
    assert ((out >= 0) & (out < 256)).all()


def test_convert_saves_and_reports(decoders, tmp_path):
    import json

    out = tmp_path / "llama.int8.onnx"
    res = convert_decoder(str(decoders["llama"]), out,
                          recipe=Recipe(target="jetson", outliers=("none",), **FAST))
    assert out.is_file()
    report = json.loads((tmp_path / "llama.int8.report.json").read_text())
    assert report["target"] == "jetson" and report["fidelity"]["output"] == "logits"
    m = ir.load(out)
    assert m.metadata_props["onnxq.task"] == "text-generation"
    assert res.fidelity.mean_cosine > 0.9


def test_jetson_lowers_to_opset_21(decoders):
    res = convert_decoder(_load(decoders, "qwen2"), recipe=Recipe(target="jetson", **FAST))
    model = res.model
    assert model.opset_imports[""] <= 21
    assert not any(n.op_type == "RMSNormalization" for n in model.graph)
    assert lint(model, "jetson") == []
    assert res.report["decoder"]["lowered"]["rms_decomposed"] > 0
    assert res.fidelity.mean_cosine >= 0.99


def test_recipe_accepts_hadamard():
    assert Recipe(outliers=("hadamard", "osplus")).outliers == ("hadamard", "osplus")


# ----------------------------------------------------------------------- DecomposeRMSNormPass


def _rms_model(shape=(2, 5, 8), scale=None, axis=-1, opset=23) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))
    gamma = np.linspace(0.5, 1.5, shape[-1]).astype(np.float32) if scale is None else scale
    g = ir.Value(name="gamma", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([shape[-1]]),
                 const_value=ir.tensor(gamma, name="gamma"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(shape)))
    node = ir.node("RMSNormalization", [x, g], {"axis": axis, "epsilon": 1e-5}, outputs=[y],
                   name="norm", metadata_props={"onnxq.module": "model.norm"})
    graph = ir.Graph([x], [y], nodes=[node], initializers=[g], opset_imports={"": opset})
    return ir.Model(graph, ir_version=10)


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_decompose_rms_norm_numerics_and_structure():
    model = _rms_model()
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) \
        * np.linspace(0.5, 1.5, 8)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-5)
    res = DecomposeRMSNormPass()(model)
    assert res.modified and res.decomposed == 1
    ops = [n.op_type for n in model.graph]
    assert ops == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    assert model.graph.outputs[0].name == "y"
    for n in model.graph:
        assert n.metadata_props["onnxq.pass"] == "DecomposeRMSNormPass"
        assert n.metadata_props["onnxq.module"] == "model.norm"
    model.opset_imports[""] = 21  # runs below 23 now
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_decompose_then_fuse_round_trips():
    model = _rms_model()
    DecomposeRMSNormPass()(model)
    assert FuseRMSNormPass()(model).modified
    (node,) = list(model.graph)
    assert node.op_type == "RMSNormalization"
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-5)
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(_rms_model(), x), rtol=1e-5, atol=1e-6)


def test_decompose_ones_scale_has_no_mul_and_skips_other_axes():
    model = _rms_model(scale=np.ones(8, np.float32))
    DecomposeRMSNormPass()(model)
    assert [n.op_type for n in model.graph][-1] == "Div"
    assert "gamma" not in model.graph.initializers  # dead scale dropped
    other = _rms_model(axis=1)
    res = DecomposeRMSNormPass()(other)
    assert not res.modified and res.skipped
    assert [n.op_type for n in other.graph] == ["RMSNormalization"]


def test_lower_opset_decomposes_and_sets_opset():
    model = _rms_model()
    info = lower_opset(model, 21)
    assert info == {"from": 23, "to": 21, "rms_decomposed": 1}
    assert model.opset_imports[""] == 21
