"""ViT/DeiT export, image calibration, MOSF and TanQ (tiny random models, fast)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import onnxq
from onnxq.calibration.images import image_batches, load_processor_config, preprocess
from onnxq.calibration.runner import calibrate
from onnxq.errors import CalibrationDataError, OnnxqError
from onnxq.exporters.vit import export_vit
from onnxq.passes._patterns import find_attention_matmuls, find_norm_sites
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.mosf import MedianScaleReparamPass, mosf_params
from onnxq.passes.tanq import (
    SIMULATION_KEY,
    TanQuantSimPass,
    fit_tanq,
    tanq_quantize,
    uniform_quantize,
)
from onnxq.targets.lint import lint
from onnxq.targets.profiles import get_target
from onnxq.testing import run
from onnxq.zoo.vit import OUTLIER_CHANNELS, sample_images, tiny_vit_dir

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(320, seed=0)


@pytest.fixture(scope="module", params=["vit", "deit"])
def exported(request, tmp_path_factory):
    folder = tiny_vit_dir(tmp_path_factory.mktemp(request.param), kind=request.param, seed=0)
    return request.param, folder, export_vit(folder)


@pytest.fixture(scope="module")
def prepared(exported, images):
    kind, folder, result = exported
    model = _clone(result.model)
    onnxq.prepare(model)
    config = load_processor_config(folder)
    pixels = np.stack([preprocess(img, config) for img in images])
    return kind, model, pixels


# --------------------------------------------------------------------------- export


def test_export_names_and_dynamic_batch(exported, images):
    import torch
    import transformers

    kind, folder, result = exported
    model = result.model
    assert result.task == "image-classification"
    assert [v.name for v in model.graph.inputs] == ["pixel_values"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    shape = model.graph.inputs[0].shape
    assert not isinstance(shape[0], int) and list(shape)[1:] == [3, 32, 32]
    props = model.metadata_props
    assert props["onnxq.task"] == "image-classification"
    assert (folder / "preprocessor_config.json").is_file()
    assert props["onnxq.image_processor"] == str(folder.resolve())
    modules = {n.metadata_props.get("onnxq.module", "") for n in model.graph}
    prefix = "vit" if kind == "vit" else "deit"
    for name in ("attention.q_proj", "attention.o_proj", "mlp.fc1", "layernorm_before"):
        assert f"{prefix}.layers.0.{name}" in modules
    assert result.max_abs_diff < 1e-4
    # logits vs torch at a batch size the export never saw
    config = load_processor_config(folder)
    pixels = np.stack([preprocess(img, config) for img in images[:5]])
    (logits,) = run(model, {"pixel_values": pixels})
    cls = (transformers.ViTForImageClassification if kind == "vit"
           else transformers.DeiTForImageClassificationWithTeacher)
    ref = cls.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_export_rejects_text_model(tmp_path):
    from onnxq.zoo.bert import tiny_bert_dir

    folder = tiny_bert_dir(tmp_path / "bert", layers=1)
    with pytest.raises(OnnxqError, match="unsupported model type"):
        export_vit(folder)


# --------------------------------------------------------------------------- images


def test_image_folder_calibration(tmp_path, images):
    from PIL import Image

    folder = tiny_vit_dir(tmp_path / "deit", kind="deit")  # resize 36 + centre crop 32
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i, img in enumerate(images[:7]):
        Image.fromarray(img).save(imgs / ("sub" if i % 2 else "") / f"{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    spec = [onnxq_spec()]
    data = image_batches(imgs, spec, processor_dir=folder, batch_size=3)
    batches = list(data)
    assert data.num_samples == 7 and len(batches) == 3
    assert batches[0]["pixel_values"].shape == (3, 3, 32, 32)
    assert batches[0]["pixel_values"].dtype == np.float32
    # the processor math: resize, centre crop, rescale, normalize (mean = std = 0.5)
    raw = json.loads((folder / "preprocessor_config.json").read_text())
    assert raw["do_center_crop"] and raw["crop_size"] == {"height": 32, "width": 32}
    px = batches[0]["pixel_values"]
    assert px.min() >= -1.0 and px.max() <= 1.0
    first = sorted(imgs.rglob("*.png"))[0]
    img = Image.open(first).convert("RGB").resize((36, 36), Image.Resampling.BICUBIC)
    manual = (np.asarray(img, np.float32)[2:34, 2:34] / 255 - 0.5) / 0.5
    np.testing.assert_allclose(px[0], manual.transpose(2, 0, 1), atol=1e-5)
    # limited samples
    assert image_batches(imgs, spec, processor_dir=folder, samples=2).num_samples == 2


def onnxq_spec():
    from onnxq.calibration.data import InputSpec

    return InputSpec("pixel_values", np.dtype(np.float32), ("batch", 3, 32, 32))


def test_image_calibration_errors(tmp_path):
    folder = tiny_vit_dir(tmp_path / "vit", kind="vit")
    spec = [onnxq_spec()]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationDataError, match="holds no images") as err:
        image_batches(empty, spec, processor_dir=folder)
    assert "\n" not in str(err.value)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        image_batches(tmp_path / "missing", spec, processor_dir=folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(CalibrationDataError, match="cannot be read") as err:
        image_batches(bad, spec, processor_dir=folder)
    assert "\n" not in str(err.value) and "broken.jpg" in str(err.value)
    with pytest.raises(CalibrationDataError, match="preprocessor_config.json"):
        image_batches(bad, spec, processor_dir=tmp_path / "empty")
    from onnxq.calibration.data import InputSpec

    wrong = [InputSpec("pixel_values", np.dtype(np.float32), ("batch", 3, 48, 48))]
    good = tmp_path / "good"
    good.mkdir()
    from PIL import Image

    Image.fromarray(sample_images(1)[0]).save(good / "a.png")
    with pytest.raises(CalibrationDataError, match="makes 32x32 images"):
        image_batches(good, wrong, processor_dir=folder)


def test_npz_calibration_delegates(tmp_path):
    path = tmp_path / "px.npz"
    np.savez(path, pixel_values=np.zeros((5, 3, 32, 32), np.float32))
    data = image_batches(path, [onnxq_spec()], batch_size=2)
    assert data.num_samples == 5 and len(data) == 3
    np.savez(tmp_path / "wrong.npz", images=np.zeros((5, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationDataError, match="no array for model input"):
        image_batches(tmp_path / "wrong.npz", [onnxq_spec()])


# --------------------------------------------------------------------------- MOSF


def test_mosf_params_algebra():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * rng.uniform(0.5, 3, 8) + rng.normal(size=8) * 4
    x[:, 2] = 30 * x[:, 2] + 50
    for symmetric in (True, False):
        m, r, s_tilde, z_tilde = mosf_params(x.min(0), x.max(0), bits=8, symmetric=symmetric)
        xt = (x - m) / r
        s = (x.max(0) - x.min(0)) / 255
        assert s_tilde == pytest.approx(np.median(s))
        # every channel now spans the same grid: per-tensor == per-channel quantization
        np.testing.assert_allclose(xt.max(0) - xt.min(0), 255 * s_tilde, rtol=1e-9)
        if symmetric:
            np.testing.assert_allclose(xt.max(0), -xt.min(0), rtol=1e-9)
        else:
            q_tensor = np.rint(xt / s_tilde) + z_tilde
            q_channel = np.rint(x / s) + np.rint(-x.min(0) / s)
            assert np.max(np.abs(q_tensor - q_channel)) <= 1


def _norm_stats(model, pixels):
    names = [s.output.name for s in find_norm_sites(model.graph)]
    return calibrate(model, [{"pixel_values": pixels[i: i + 32]} for i in range(0, 96, 32)],
                     tensors=names)


def test_mosf_fp32_equivalent_and_structure(prepared):
    kind, model, pixels = prepared
    model = _clone(model)
    feeds = {"pixel_values": pixels[96:160]}
    (before,) = run(model, feeds)
    sites = find_norm_sites(model.graph)
    assert len(sites) == 4  # layernorm_before -> q/k/v, layernorm_after -> fc1, per layer
    gammas = {s.module: np.array(s.norm.inputs[1].const_value.numpy()) for s in sites}
    stats = _norm_stats(model, pixels)
    result = MedianScaleReparamPass(stats=stats)(model)
    assert result.modified and len(result.sites) == 4 and not result.skipped
    for info in result.sites:
        assert info["range_ratio_before"] > 5  # the planted outliers
        assert info["range_ratio_after"] == pytest.approx(1.0, abs=1e-6)
        assert info["max_ratio"] > 3
    (after,) = run(model, feeds)
    rel = np.max(np.abs(after - before)) / np.max(np.abs(before))
    assert rel <= 1e-4
    counts = {n.op_type for n in model.graph}
    assert "Mul" in counts  # (from the export); no restore nodes for pre-LN ViT
    assert not any(n.metadata_props.get("onnxq.pass") == "MedianScaleReparamPass"
                   for n in model.graph)
    for site in find_norm_sites(model.graph):
        gamma = site.norm.inputs[1].const_value.numpy()
        strong = OUTLIER_CHANNELS[0]
        assert abs(gamma[strong]) < abs(gammas[site.module][strong])
        assert site.norm.metadata_props.get("onnxq.folded") == "MedianScaleReparamPass"
    # idempotent: a second run with the same stats folds nothing
    again = MedianScaleReparamPass(stats=stats)(model)
    assert not again.modified and all(s["reason"] == "already folded" for s in again.skipped)
    (twice,) = run(model, feeds)
    np.testing.assert_array_equal(twice, after)


def test_mosf_untouched_without_stats(prepared):
    _, model, pixels = prepared
    model = _clone(model)
    from onnxq.calibration.stats import Stats

    stats = calibrate(model, [{"pixel_values": pixels[:8]}])  # linear inputs only
    empty = Stats(fingerprint=stats.fingerprint, observers={}, meta={})
    before = ir.serde.serialize_model(model).SerializeToString()
    result = MedianScaleReparamPass(stats=empty)(model)
    assert not result.modified
    assert {s["reason"] for s in result.skipped} == {"no statistics"}
    assert ir.serde.serialize_model(model).SerializeToString() == before


def _quality(reference, logits):
    cos = np.sum(reference * logits, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(logits, axis=1))
    return float(cos.mean()), float(np.mean(reference.argmax(1) == logits.argmax(1)))


def test_end_to_end_w8a8_mosf(prepared):
    kind, model, pixels = prepared
    model = _clone(model)
    cal = [{"pixel_values": pixels[i: i + 32]} for i in range(0, 64, 32)]
    held = {"pixel_values": pixels[64:]}  # 256 images never used for calibration
    (reference,) = run(model, held)
    assert len(np.unique(reference.argmax(1))) >= 5  # a real spread of classes

    def w8a8(mosf: bool):
        m = _clone(model)
        if mosf:
            MedianScaleReparamPass(stats=_norm_stats(m, pixels[:64]))(m)
        stats = calibrate(m, cal)
        InsertQDQPass(stats=stats, target=get_target("tensorrt"))(m)
        assert not [v for v in lint(m, "tensorrt") if v.severity == "error"]
        # Reference Q/DQ semantics (onnxruntime without its int8 kernel fusions).
        (logits,) = run(m, held)
        return _quality(reference, logits)

    plain = w8a8(False)
    cos, top1 = w8a8(True)
    assert cos >= 0.99 and top1 >= 0.95, (kind, cos, top1)
    assert cos > plain[0]


# --------------------------------------------------------------------------- TanQ


def _softmax_like(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n // 17, 17)) * 2.5
    logits[:, 0] += 3  # a dominant token, as attention to CLS / self
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).reshape(-1)


def test_tanq_beats_uniform_4bit():
    p = _softmax_like()
    params, mse, uniform_mse = fit_tanq(p, bits=4)
    assert params.alpha > 0 and 0 <= params.center <= 0.5
    held = _softmax_like(seed=1)
    err_tanq = np.mean((tanq_quantize(held, params) - held) ** 2)
    err_uniform = np.mean((uniform_quantize(held, bits=4) - held) ** 2)
    assert err_tanq < err_uniform
    levels = params.codebook()
    assert len(levels) == 16 and levels[0] == pytest.approx(0) and levels[-1] == pytest.approx(1)
    gaps = np.diff(levels)
    assert gaps[-1] <= gaps[len(gaps) // 2]  # denser near 1 than in the middle


def test_tanq_pass_structure_and_lint(prepared):
    kind, model, pixels = prepared
    model = _clone(model)
    feeds = {"pixel_values": pixels[:32]}
    pv_inputs = [a.node.inputs[0].name for a in find_attention_matmuls(model.graph)
                 if a.kind == "pv"]
    stats = calibrate(model, [feeds], tensors=pv_inputs)
    (fp,) = run(model, feeds)
    result = TanQuantSimPass(bits=4, stats=stats)(model)
    assert len(result.sites) == 2 and all(s["fitted"] for s in result.sites)
    assert all(s["mse"] <= s["uniform_mse"] for s in result.sites)
    sim = [n for n in model.graph if n.metadata_props.get(SIMULATION_KEY) == "tanq"]
    assert {"Tan", "Atan", "Round", "Clip"} <= {n.op_type for n in sim}
    for node in model.graph:
        if node.op_type == "Softmax":
            for use in node.outputs[0].uses():
                assert use.node.metadata_props.get(SIMULATION_KEY) == "tanq"
    (sim_out,) = run(model, feeds)
    assert np.all(np.isfinite(sim_out))
    assert _quality(fp, sim_out)[0] > 0.9
    rules = {v.rule for v in lint(model, "tensorrt") if v.severity == "error"}
    assert "simulation-only" in rules
    assert not TanQuantSimPass(bits=4, stats=stats)(model).modified  # idempotent
