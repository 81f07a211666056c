"""onnxq.eval.analyze / onnxq.eval.compare and the `analyze` / `compare` commands (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import onnxq
import onnxq.zoo
from onnxq.calibration.runner import calibrate
from onnxq.errors import OnnxqError
from onnxq.eval.analyze import analysis_tensors, analyze, format_analysis, site_verdict
from onnxq.eval.compare import compare, format_ranking, quantized_sites, ranking
from onnxq.recipe import Recipe
from onnxq.testing import encoder_block_model, random_feeds


def _feeds(model, n=3, seed=0, scale=1.0):
    out = []
    for i in range(n):
        f = random_feeds(model, batch=4, seq=8, seed=seed + i)
        out.append({k: (v * scale).astype(v.dtype) for k, v in f.items()})
    return out


# ------------------------------------------------------------------- analyze
def test_sites_in_graph_order_with_kinds():
    m = encoder_block_model()
    sites = analysis_tensors(m)
    assert [(t, k) for t, _, k in sites] == [
        ("ln1", "norm-output"), ("gelu", "ffn-input"), ("residual", "residual")]
    assert [mod for _, mod, _ in sites][:2] == ["ln1", "fc2"]


def test_planted_channel_is_named_and_gets_os_plus():
    m = encoder_block_model(outlier_channel=3)
    res = analyze(m, [_feeds(m), _feeds(m, seed=10)], names=["a", "b"])
    ln1 = res.site("ln1")
    assert ln1.top_channels[0][0] == 3
    assert 3 in ln1.outlier_channels
    assert ln1.verdict == "OS+"
    assert ln1.channel_ratio > 6
    assert 0 <= ln1.asymmetry <= 1 + 1e-9
    assert len(ln1.scales) == 2 and ln1.sensitivity is not None and ln1.sensitivity >= 0
    assert res.datasets == ["a", "b"]
    d = res.as_dict()
    json.dumps(d)  # JSON-serialisable
    assert d["sites"][0]["top_channels"][0][0] == 3
    text = format_analysis(res)
    assert "ln1" in text and "OS+" in text


def test_without_outliers_the_norm_needs_nothing():
    m = encoder_block_model(outlier_channel=None)
    res = analyze(m, [_feeds(m)])
    assert res.site("ln1").verdict == "none"
    assert res.site("ln1").sensitivity is None  # one data set


def test_sensitive_extreme_site_is_kept_in_fp():
    assert site_verdict("ffn-input", max_median_ratio=5000.0, channel_ratio=50.0,
                        kurtosis=900.0, outlier_fraction=0.01, sensitivity=1.0)[0] == "keep FP"
    assert site_verdict("ffn-input", max_median_ratio=200.0, channel_ratio=20.0,
                        kurtosis=900.0, outlier_fraction=0.01, sensitivity=0.0)[0] == "PEG"
    assert site_verdict("linear-input", max_median_ratio=300.0, channel_ratio=20.0,
                        kurtosis=400.0, outlier_fraction=0.4, sensitivity=None)[0] == "Hadamard"
    assert site_verdict("linear-input", max_median_ratio=80.0, channel_ratio=2.0,
                        kurtosis=60.0, outlier_fraction=0.0, sensitivity=None)[0] == "Hadamard"
    assert site_verdict("linear-input", max_median_ratio=40.0, channel_ratio=8.0,
                        kurtosis=10.0, outlier_fraction=0.01,
                        sensitivity=None)[0] == "SmoothQuant"


def test_analyze_needs_data():
    with pytest.raises(OnnxqError):
        analyze(encoder_block_model(), [])


# ------------------------------------------------------------------- compare
def _quantized(model, feeds, **recipe):
    q = model.clone()
    stats = calibrate(q, feeds)
    onnxq.quantize(q, stats, recipe=Recipe(int8_embeddings=False, **recipe))
    return q


def test_compare_rows_in_graph_order_and_finite():
    m = encoder_block_model()
    feeds = _feeds(m)
    q = _quantized(m, feeds)
    roles = [(r, t) for r, t, _, _ in quantized_sites(q)]
    assert roles == [("activation", "ln1"), ("output", "fc1_out"),
                     ("activation", "gelu"), ("output", "fc2_out")]
    errs = compare(m, q, _feeds(m, seed=5))
    assert [e.tensor for e in errs] == ["ln1", "fc1_out", "gelu", "fc2_out", "y"]
    assert errs[-1].role == "model-output"
    for e in errs:
        assert e.sqnr_db is not None and math.isfinite(e.sqnr_db) and e.sqnr_db > 10
        assert 0 <= e.rel_error < 0.3
        assert math.isclose(e.rel_error, 10 ** (-e.sqnr_db / 20), rel_tol=1e-6)
    assert errs[0].module == "fc1" and errs[2].module == "fc2"
    # the first activation has no upstream error: FP32 SQNR == local SQNR
    assert errs[0].sqnr_db == pytest.approx(errs[0].local_sqnr_db, rel=1e-9)
    assert ranking(errs)[0].sqnr_db == min(e.sqnr_db for e in errs)
    text = format_ranking(errs, top=2)
    assert "worst 2 activations" in text and "model output y" in text
    json.dumps([e.as_dict() for e in errs])


def test_compare_refuses_a_graph_without_qdq():
    m = encoder_block_model()
    with pytest.raises(OnnxqError, match="nothing to compare"):
        compare(m, m, _feeds(m))


def test_compare_through_outlier_passes(tmp_path):
    """onnxq's converted graph (OS+ refolded norms, PEG groups) maps back to FP32."""
    path = onnxq.zoo.tiny_bert_onnx(tmp_path / "tiny")
    fp32, _ = onnxq.load_source(path)
    onnxq.prepare(fp32)
    res = onnxq.convert(path, recipe=Recipe(samples=32, validate_samples=0))
    q = res.model
    from onnxq.calibration import data as D

    data = D.load_calibration(None, D.input_specs(fp32), tokenizer=path.parent, samples=16,
                              batch_size=8, split="heldout")
    errs = compare(fp32, q, data)
    acts = [e for e in errs if e.role == "activation"]
    assert acts and all(e.local_sqnr_db is not None for e in acts)
    refolded = [e for e in acts if "refolded" in e.note]
    assert refolded, "OS+ norms should be compared through their refolded gamma/beta"
    missing = [e.tensor for e in errs if e.sqnr_db is None]
    assert not missing, f"no FP32 reference for {missing}"
    out = [e for e in errs if e.role == "model-output"]
    assert out and out[0].sqnr_db > 10
    for e in acts:
        assert e.sqnr_db > 5, e


def test_tiny_bert_analysis_names_planted_channel(tmp_path):
    path = onnxq.zoo.tiny_bert_onnx(tmp_path / "tiny")
    m, tok = onnxq.load_source(path)
    onnxq.prepare(m)
    from onnxq.calibration import data as D

    specs = D.input_specs(m)
    sets = [D.load_calibration(None, specs, tokenizer=tok, samples=32, batch_size=16, split=s)
            for s in ("calib", "heldout")]
    res = analyze(m, sets)
    att_ln = [s for s in res.sites if s.kind == "norm-output"
              and s.module.endswith("attention.output.LayerNorm")]
    assert att_ln
    for s in att_ln:
        assert s.top_channels[0][0] == onnxq.zoo.OUTLIER_CHANNELS[0]
        assert s.verdict == "OS+"
    ffn = [s for s in res.sites if s.kind == "ffn-input"]
    assert ffn and all(s.module.endswith("output.dense") for s in ffn)
    for i, s in enumerate(ffn):
        assert s.top_channels[0][0] == onnxq.zoo.ffn_outlier_channel(i, 128)
        assert s.verdict in ("PEG", "keep FP")
    assert all(s.sensitivity is not None for s in res.sites)


# ----------------------------------------------------------------------- CLI
def _invoke(cmd, args):
    from onnxq.cli_inspect import analyze as a_cmd
    from onnxq.cli_inspect import compare as c_cmd

    return CliRunner().invoke({"analyze": a_cmd, "compare": c_cmd}[cmd], args,
                              catch_exceptions=True)


def test_cli_analyze_and_compare(tmp_path):
    import onnx_ir as ir

    m = encoder_block_model()
    fp32 = tmp_path / "fp32.onnx"
    ir.save(m, fp32)
    rng = np.random.default_rng(0)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=rng.standard_normal((16, 8, 16)).astype(np.float32))
    npz2 = tmp_path / "x2.npz"
    np.savez(npz2, x=(3 * rng.standard_normal((16, 8, 16))).astype(np.float32))
    r = _invoke("analyze", [str(fp32), "--calib", str(npz), "--calib", str(npz2),
                            "--batch-size", "8", "--json", str(tmp_path / "a.json"), "--all"])
    assert r.exit_code == 0, r.output
    assert "ln1" in r.output and "OS+" in r.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["sites"][0]["tensor"] == "ln1" and len(data["datasets"]) == 2
    assert "calibrate set 1" in data["timings_s"]

    q = _quantized(m, _feeds(m))
    qpath = tmp_path / "q.onnx"
    ir.save(q, qpath)
    r = _invoke("compare", [str(fp32), str(qpath), "--data", str(npz), "--batch-size", "8",
                            "--json", str(tmp_path / "c.json"), "--top", "3"])
    assert r.exit_code == 0, r.output
    assert "worst" in r.output and "SQNR" in r.output
    c = json.loads((tmp_path / "c.json").read_text())
    rows = c["models"][str(qpath)]
    assert [x["tensor"] for x in rows][:2] == ["ln1", "fc1_out"]
    assert "compare" in c["timings_s"]


def test_cli_user_errors_are_onnxq_errors(tmp_path):
    import onnx_ir as ir

    fp32 = tmp_path / "fp32.onnx"
    ir.save(encoder_block_model(), fp32)
    r = _invoke("compare", [str(fp32), str(fp32), "--data", str(tmp_path / "missing.npz")])
    assert r.exit_code != 0 and isinstance(r.exception, OnnxqError)
    r = _invoke("analyze", [str(fp32), "--json", str(tmp_path / "no" / "a.json")])
    assert isinstance(r.exception, OnnxqError) and "does not exist" in str(r.exception)
