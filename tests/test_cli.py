"""The command line: bad input gives one clear line and exit code 2, never a traceback,
and never a partial output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.testing import encoder_block_model


def onnxq(*args, cwd=None, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True,
                          text=True, cwd=cwd, env=e, timeout=300)


@pytest.fixture()
def block(tmp_path):
    path = tmp_path / "block.onnx"
    ir.save(encoder_block_model(), path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((200, 6, 16)).astype(np.float32))
    return path


def _one_clear_line(proc, code=2):
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("onnxq: error:")
    return lines[0]


def test_convert_onnx_with_npz_calibration(block, tmp_path):
    out = tmp_path / "out.onnx"
    proc = onnxq("convert", str(block), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--target", "tensorrt")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["target"] == "tensorrt"
    assert report["coverage"]["fraction"] == 1.0
    assert report["lint"] == []
    assert report["fidelity"]["mean_cosine"] > 0.95
    assert (tmp_path / "out.report.md").exists()
    assert "<table" in (tmp_path / "out.report.html").read_text()
    assert "mean cosine" in proc.stdout
    lint = onnxq("lint", str(out), "--target", "tensorrt")
    assert lint.returncode == 0, lint.stdout
    # same input, same bytes out
    out2 = tmp_path / "out2.onnx"
    proc2 = onnxq("convert", str(block), "-o", str(out2), "--calib", str(tmp_path / "calib.npz"),
                  "--target", "tensorrt")
    assert proc2.returncode == 0
    assert out.read_bytes() == out2.read_bytes()


def test_calibrate_then_quantize_with_stats_file(block, tmp_path):
    stats = tmp_path / "stats.npz"
    proc = onnxq("calibrate", str(block), "-o", str(stats), "--calib", str(tmp_path / "calib.npz"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "q.onnx"
    proc = onnxq("quantize", str(block), "-o", str(out), "--stats", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    # stats from another graph are refused
    other = tmp_path / "other.onnx"
    ir.save(encoder_block_model(seed=3), other)
    out3 = tmp_path / "q3.onnx"
    line = _one_clear_line(onnxq("quantize", str(other), "-o", str(out3), "--stats", str(stats)))
    assert "different graph" in line
    assert not out3.exists()


@pytest.mark.parametrize(
    "setup,needle",
    [
        ("missing", "does not exist"),
        ("truncated", "not a readable ONNX"),
        ("garbage", "not a readable ONNX"),
        ("empty", "empty"),
    ],
)
def test_bad_model_files(tmp_path, block, setup, needle):
    bad = tmp_path / "bad.onnx"
    if setup == "truncated":
        data = block.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif setup == "garbage":
        bad.write_bytes(b"this is not a model" * 10)
    elif setup == "empty":
        bad.write_bytes(b"")
    out = tmp_path / "o.onnx"
    line = _one_clear_line(onnxq("convert", str(bad), "-o", str(out),
                                 "--calib", str(tmp_path / "calib.npz")))
    assert needle in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.onnx")]


def test_missing_external_data(tmp_path, block):
    model = encoder_block_model()
    path = tmp_path / "ext.onnx"
    ir.save(model, path, external_data="ext.onnx.data", size_threshold_bytes=0)
    os.remove(tmp_path / "ext.onnx.data")
    line = _one_clear_line(onnxq("lint", str(path)))
    assert "external data" in line


def test_bad_calibration_inputs(tmp_path, block):
    out = tmp_path / "o.onnx"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = _one_clear_line(onnxq("convert", str(block), "-o", str(out), "--calib", str(empty)))
    assert "no samples" in line or "tokenizer" in line
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=np.zeros((4, 6, 16), np.float32))
    line = _one_clear_line(onnxq("convert", str(block), "-o", str(out), "--calib", str(wrong)))
    assert "x" in line
    nan = tmp_path / "nan.npz"
    arr = np.zeros((8, 6, 16), np.float32)
    arr[0, 0, 0] = np.nan
    np.savez(nan, x=arr)
    line = _one_clear_line(onnxq("convert", str(block), "-o", str(out), "--calib", str(nan)))
    assert "NaN" in line or "nan" in line.lower()
    assert not out.exists()


def test_unknown_target_and_method(tmp_path, block):
    out = tmp_path / "o.onnx"
    line = _one_clear_line(onnxq("convert", str(block), "-o", str(out), "--target", "tpu"))
    assert "unknown target" in line
    line = _one_clear_line(onnxq("lint", str(block), "--target", "tpu"))
    assert "unknown target" in line
    line = _one_clear_line(onnxq("convert", str(block), "-o", str(out), "--method", "magic"))
    assert "unknown calibration method" in line


def test_model_folder_without_weights(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    out = tmp_path / "o.onnx"
    line = _one_clear_line(onnxq("convert", str(folder), "-o", str(out)))
    assert "weights" in line
    assert not out.exists()


def test_lint_reports_violations_with_nonzero_exit(tmp_path, block):
    out = tmp_path / "u8.onnx"
    proc = onnxq("convert", str(block), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--target", "ort-cpu", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    lint = onnxq("lint", str(out), "--target", "tensorrt")
    assert lint.returncode == 1
    assert "zero-point" in lint.stdout or "qdq-type" in lint.stdout


def test_convert_tiny_bert_with_jsonl_text_field(tmp_path):
    pytest.importorskip("torch")
    from onnxq.zoo import tiny_bert_onnx

    model = tiny_bert_onnx(tmp_path / "tiny")
    calib = tmp_path / "calib.jsonl"
    words = "the quick brown fox jumps over a lazy dog near the river bank".split()
    with open(calib, "w") as f:
        for i in range(80):
            f.write(json.dumps({"sentence": " ".join(words[i % 7:] + words[: i % 5])}) + "\n")
    out = tmp_path / "tiny.int8.onnx"
    proc = onnxq("convert", str(model), "-o", str(out), "--calib", str(calib),
                 "--text-field", "sentence", "--target", "ort-cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "tiny.int8.report.json").read_text())
    assert report["fidelity"]["samples"] == 16  # the last fifth is held out
    assert report["fidelity"]["mean_cosine"] > 0.95
    line = _one_clear_line(onnxq("convert", str(model), "-o", str(out), "--calib", str(calib)))
    assert "text" in line and str(calib.name) in line


def test_min_cosine_fallback_keeps_worst_layers_in_fp(block, tmp_path):
    out = tmp_path / "fb.onnx"
    proc = onnxq("convert", str(block), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--min-cosine", "0.999999", "--outliers", "none")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "fb.report.json").read_text())
    fb = report["fallback"]
    assert fb["steps"][0]["kept_fp"] is None
    assert len(fb["steps"]) >= 2 and fb["kept_fp"]
    # each step keeps one more layer in floating point; the final fidelity is the last step's
    assert report["fidelity"]["mean_cosine"] == fb["steps"][-1]["mean_cosine"]
    assert set(report["kept_fp"]) == set(fb["kept_fp"])
    assert fb["steps"][-1]["mean_cosine"] >= fb["steps"][0]["mean_cosine"]
    assert "fallback to cosine" in proc.stdout
