"""Mamba decode-step export, runtime, QuambaPass and Quamba W8A8 on tiny random models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxq.calibration.observers import TensorObserver, compute_range, percentile_range  # noqa: E402
from onnxq.calibration.runner import calibrate  # noqa: E402
from onnxq.exporters.mamba import (  # noqa: E402
    MAMBA_TASK,
    _hf_stepwise_logits,
    export_mamba_step,
    step_io_names,
)
from onnxq.passes.quamba import (  # noqa: E402
    QUAMBA_KEEP_FP,
    QuambaPass,
    quamba_methods,
    quamba_qdq_options,
    quamba_target,
    quamba_w8a8,
    ssm_tensors,
)
from onnxq.runtime.mamba import MambaSession  # noqa: E402
from onnxq.testing import op_counts, to_proto  # noqa: E402
from onnxq.zoo.mamba import (  # noqa: E402
    SSM_OUTLIER_CHANNELS,
    tiny_mamba_dir,
    tiny_mamba_text_ids,
)

STEPS = 16


def _load_hf(folder):
    model = transformers.MambaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_mamba_dir(tmp_path_factory.mktemp("mamba64"), seed=0, outliers=True)
    result = export_mamba_step(folder)
    return folder, result


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory):
    """hidden 48 -> D_inner 96 = 12 * 8 (non-power-of-two: Kronecker Hadamard)."""
    folder = tiny_mamba_dir(tmp_path_factory.mktemp("mamba48"), seed=1, hidden=48)
    return folder, export_mamba_step(folder, validate=False).model


def _cos(a, b):
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# --------------------------------------------------------------------------- export


def test_export_names_shapes_and_metadata(tiny):
    folder, result = tiny
    model = result.model
    inputs, outputs = step_io_names(2)
    assert inputs == ["input_ids", "conv_state.0", "ssm_state.0", "conv_state.1", "ssm_state.1"]
    assert [v.name for v in model.graph.inputs] == inputs == result.input_names
    assert [v.name for v in model.graph.outputs] == outputs == result.output_names
    assert outputs[0] == "logits" and outputs[1:3] == ["conv_state_out.0", "ssm_state_out.0"]
    shapes = {v.name: [d if isinstance(d, int) else "B" for d in v.shape] for v in
              [*model.graph.inputs, *model.graph.outputs]}
    assert shapes["input_ids"] == ["B", 1]
    assert shapes["conv_state.0"] == shapes["conv_state_out.1"] == ["B", 128, 3]
    assert shapes["ssm_state.1"] == shapes["ssm_state_out.0"] == ["B", 128, 16]
    assert shapes["logits"] == ["B", 1, 256]
    props = model.metadata_props
    assert props["onnxq.task"] == MAMBA_TASK == result.task
    assert props["onnxq.model_type"] == "mamba"
    assert props["onnxq.mamba.d_inner"] == "128" and props["onnxq.mamba.d_conv"] == "3"
    assert props["onnxq.tokenizer"]
    modules = {n.metadata_props.get("onnxq.module") for n in model.graph}
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        assert f"backbone.layers.0.mixer.{name}" in modules
        assert f"backbone.layers.1.mixer.{name}.weight" in model.graph.initializers
    assert "lm_head" in modules
    assert ssm_tensors(model, "ssm_input") == [
        "backbone.layers.0.mixer.ssm_input", "backbone.layers.1.mixer.ssm_input"]
    assert ssm_tensors(model, "ssm_output") == [
        "backbone.layers.0.mixer.ssm_output", "backbone.layers.1.mixer.ssm_output"]
    for node in model.graph:
        role = node.metadata_props.get("onnxq.role")
        if role:
            users = {u.node.metadata_props.get("onnxq.module") for u in node.outputs[0].uses()}
            linear = "x_proj" if role == "ssm_input" else "out_proj"
            assert f"backbone.layers.{node.metadata_props['onnxq.layer']}.mixer.{linear}" in users
    assert result.max_abs_diff < 1e-4
    onnx.checker.check_model(to_proto(model))


def test_step_logits_match_hf_cache_stepping(tiny):
    folder, result = tiny
    hf = _load_hf(folder)
    ids = tiny_mamba_text_ids(folder, split="heldout", sequences=3, length=STEPS)
    expected = _hf_stepwise_logits(hf, ids)
    actual = MambaSession(result.model).teacher_forced_logits(ids)
    assert actual.shape == (3, STEPS, 256)
    assert _rel(actual, expected) <= 1e-4
    # the whole-sequence (no cache) forward agrees too
    with torch.no_grad():
        full = hf(torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert _rel(actual, full) <= 1e-4


def test_states_match_hf_cache(tiny):
    folder, result = tiny
    hf = _load_hf(folder)
    ids = tiny_mamba_text_ids(folder, sequences=2, length=5)
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), use_cache=True)
    sess = MambaSession(result.model)
    sess.prefill(ids)
    for i in range(2):
        conv = out.cache_params.get_conv_state(i, state_idx=0).numpy()
        ssm = out.cache_params.get_recurrent_state(i, state_idx=0).numpy()
        np.testing.assert_allclose(sess.states[f"conv_state.{i}"], conv[:, :, 1:], atol=1e-5)
        np.testing.assert_allclose(sess.states[f"ssm_state.{i}"], ssm, atol=1e-4)


def test_runtime_greedy_generate_matches_hf(tiny, tmp_path):
    folder, result = tiny
    path = tmp_path / "step.onnx"
    ir.save(result.model, path)
    sess = MambaSession(path)
    prompt = tiny_mamba_text_ids(folder, split="heldout", sequences=2, length=6)
    hf = _load_hf(folder)
    with torch.no_grad():
        expected = hf.generate(
            torch.from_numpy(prompt), max_new_tokens=10, min_new_tokens=10, do_sample=False,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        ).numpy()
    got = sess.generate(prompt, max_new_tokens=10)
    np.testing.assert_array_equal(got, expected)
    # prefill + step == teacher forcing
    tf = sess.teacher_forced_logits(got[:, :8])
    last = sess.prefill(got[:, :7])
    np.testing.assert_allclose(last, tf[:, 6], atol=1e-6)
    np.testing.assert_allclose(sess.step(got[:, 7]), tf[:, 7], atol=1e-6)
    assert sess.batch == 2
    with pytest.raises(ValueError):
        sess.step([1, 2, 3])


def test_export_rejects_non_mamba(tmp_path):
    from onnxq.errors import OnnxqError
    from onnxq.zoo.bert import tiny_bert_dir

    folder = tiny_bert_dir(tmp_path / "bert", vocab=128)
    with pytest.raises(OnnxqError, match="mamba"):
        export_mamba_step(folder)


# --------------------------------------------------------------------------- QuambaPass


@pytest.mark.parametrize("seed", [None, 7])
def test_quamba_pass_dense_structure_and_fp32_equivalence(tiny, seed):
    folder, result = tiny
    ref_model = result.model
    model = ref_model.clone()
    res = QuambaPass(seed=seed)(model)
    assert res.modified and len(res.sites) == 2
    assert all(s["form"] == "dense" and s["factors"] == (128,) for s in res.sites)
    counts, before = op_counts(model), op_counts(ref_model)
    assert counts["MatMul"] == before["MatMul"] + 2
    for i in range(2):
        out_proj = next(n for n in model.graph
                        if n.metadata_props.get("onnxq.module") == f"backbone.layers.{i}.mixer.out_proj")
        had = out_proj.inputs[0].producer()
        assert had.op_type == "MatMul"
        assert had.metadata_props["onnxq.module"] == f"backbone.layers.{i}.mixer.out_proj.online_hadamard"
        assert had.inputs[0].name == f"backbone.layers.{i}.mixer.ssm_output"
        h = had.inputs[1].const_value.numpy().astype(np.float64)
        np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
        assert out_proj.metadata_props["onnxq.hadamard"] == "QuambaPass"
    ids = tiny_mamba_text_ids(folder, split="heldout", sequences=2, length=STEPS)
    ref = MambaSession(ref_model).teacher_forced_logits(ids)
    got = MambaSession(model).teacher_forced_logits(ids)
    assert _rel(got, ref) <= 1e-4
    onnx.checker.check_model(to_proto(model))


def test_quamba_pass_kronecker_non_power_of_two(tiny96):
    folder, ref_model = tiny96
    model = ref_model.clone()
    res = QuambaPass(seed=3)(model)
    assert [s["form"] for s in res.sites] == ["kronecker", "kronecker"]
    assert res.sites[0]["factors"] == (12, 8) and res.sites[0]["size"] == 96
    assert res.sites[0]["nodes"] == ["Mul", "Reshape", "MatMul", "MatMul", "Reshape"]
    ids = tiny_mamba_text_ids(folder, split="heldout", sequences=2, length=STEPS)
    ref = MambaSession(ref_model).teacher_forced_logits(ids)
    got = MambaSession(model).teacher_forced_logits(ids)
    assert _rel(got, ref) <= 1e-4
    # the rotated SSM output is flat: its max falls far below the raw max
    feeds = MambaSession(ref_model).calibration_feeds(ids)
    stats = calibrate(model, feeds, tensors=["backbone.layers.0.mixer.ssm_output",
                                             res.sites[0]["rotated"]])
    raw, rot = (stats[n].absmax for n in stats.names())
    assert rot < raw / 3


def test_quamba_pass_forced_kronecker_on_power_of_two(tiny):
    folder, result = tiny
    model = result.model.clone()
    res = QuambaPass(form="kronecker")(model)
    assert res.sites[0]["factors"] == (16, 8)
    ids = tiny_mamba_text_ids(folder, split="heldout", sequences=1, length=STEPS)
    ref = MambaSession(result.model).teacher_forced_logits(ids)
    assert _rel(MambaSession(model).teacher_forced_logits(ids), ref) <= 1e-4


def test_quamba_pass_contract(tiny):
    from onnxq.testing import encoder_block_model

    model = tiny[1].model.clone()
    QuambaPass()(model)
    again = QuambaPass()(model)  # idempotent
    assert not again.modified and not again.sites
    other = encoder_block_model()  # no Mamba sites: untouched
    assert not QuambaPass()(other).modified
    with pytest.raises(ValueError):
        QuambaPass(form="fft")
    # without role tags the pass falls back to the out_proj module names
    untagged = tiny[1].model.clone()
    for node in untagged.graph:
        node.metadata_props.pop("onnxq.role", None)
    assert len(QuambaPass()(untagged).sites) == 2


# --------------------------------------------------------------------------- W8A8


def test_quamba_methods_and_percentile_method_string(tiny):
    model = tiny[1].model
    assert quamba_methods(model) == {
        "backbone.layers.0.mixer.ssm_input": "percentile",
        "backbone.layers.1.mixer.ssm_input": "percentile",
    }
    assert set(quamba_methods(model, percentile=99.9).values()) == {"percentile:99.9"}
    opts = quamba_qdq_options(model, percentile=None)
    assert opts == {"methods": {}, "keep_fp": QUAMBA_KEEP_FP}
    assert quamba_target().weight_per_channel is False
    obs = TensorObserver()
    obs.update(np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32))
    assert compute_range(obs, "percentile:99") == percentile_range(obs, percentile=99)
    with pytest.raises(ValueError):
        compute_range(obs, "percentile:abc")


def test_w8a8_quamba_cosine_over_64_steps(tiny):
    folder, result = tiny
    fp32 = result.model
    calib = tiny_mamba_text_ids(folder, split="calib", sequences=8, length=64)
    held = tiny_mamba_text_ids(folder, split="heldout", sequences=4, length=64)
    feeds = MambaSession(fp32).calibration_feeds(calib)
    assert len(feeds) == 64 and set(feeds[0]) == set(step_io_names(2)[0])
    ref = MambaSession(fp32).teacher_forced_logits(held)

    quamba = quamba_w8a8(fp32, feeds)
    plain = quamba_w8a8(fp32, feeds, hadamard=False, percentile=None)
    cos_q = float(_cos(MambaSession(quamba).teacher_forced_logits(held), ref).mean())
    cos_p = float(_cos(MambaSession(plain).teacher_forced_logits(held), ref).mean())
    assert cos_q >= 0.99, cos_q
    assert cos_q > cos_p + 0.02, (cos_q, cos_p)

    # structure: every in_proj/x_proj/dt_proj/out_proj/lm_head MatMul reads two DQs,
    # per-tensor int8 (scalar scales); the Hadamard stays float; percentile on the SSM input
    counts = op_counts(quamba)
    assert counts["QuantizeLinear"] == 9  # 4 linears x 2 layers + lm_head
    for node in quamba.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.inputs[1].const_value.numpy().size == 1
        module = node.metadata_props.get("onnxq.module", "")
        if node.op_type == "MatMul" and module.endswith(("in_proj", "x_proj", "dt_proj", "out_proj")):
            assert all(i.producer().op_type == "DequantizeLinear" for i in node.inputs)
        if module.endswith("online_hadamard"):
            assert node.inputs[0].producer() is None or node.inputs[0].producer().op_type != "DequantizeLinear"
    onnx.checker.check_model(to_proto(quamba))


def test_w8a8_kronecker_model_runs(tiny96):
    folder, fp32 = tiny96
    calib = tiny_mamba_text_ids(folder, split="calib", sequences=4, length=32)
    held = tiny_mamba_text_ids(folder, split="heldout", sequences=2, length=32)
    feeds = MambaSession(fp32).calibration_feeds(calib)
    q = quamba_w8a8(fp32, feeds, seed=0)
    ref = MambaSession(fp32).teacher_forced_logits(held)
    assert float(_cos(MambaSession(q).teacher_forced_logits(held), ref).mean()) >= 0.98


def test_planted_outliers_are_there(tiny):
    folder, result = tiny
    ids = tiny_mamba_text_ids(folder, sequences=2, length=32)
    feeds = MambaSession(result.model).calibration_feeds(ids)
    stats = calibrate(result.model, feeds)
    obs = stats["backbone.layers.0.mixer.ssm_output"]
    top = set(np.argsort(obs.ch_absmax)[-3:].tolist())
    assert top == set(SSM_OUTLIER_CHANNELS)
    assert obs.ch_absmax.max() > 30 * np.median(obs.ch_absmax)
