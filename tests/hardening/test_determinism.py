"""Same inputs, same bytes: two ``onnxq convert`` runs give byte-identical models.

The tiny BERT from the zoo, calibrated on a text file, converted twice for each of
``tensorrt`` and ``ort-cpu`` in separate processes (so nothing is shared through a
cache): the ``.onnx`` files must be identical byte for byte, and the JSON reports
identical once the wall-clock timings and the output path are set aside.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxq.calibration.default_text import calibration_texts
    from onnxq.zoo import tiny_bert_onnx

    root = tmp_path_factory.mktemp("det")
    model = tiny_bert_onnx(root / "bert")
    calib = root / "calib.txt"
    calib.write_text("\n".join(calibration_texts(60)) + "\n", encoding="utf-8")
    return model, calib


def _convert(model, calib, out, target):
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(out), "--calib",
         str(calib), "--target", target, "--seq-len", "32", "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_name(out.name.removesuffix(".onnx") + ".report.json").read_text())
    report.pop("timings_s", None)
    report.get("output", {}).pop("path", None)
    return out.read_bytes(), report


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_two_runs_are_byte_identical(bert, tmp_path, target):
    model, calib = bert
    first, report1 = _convert(model, calib, tmp_path / "a" / "model.int8.onnx", target)
    second, report2 = _convert(model, calib, tmp_path / "b" / "model.int8.onnx", target)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert first == second
    assert report1 == report2
    assert report1["target"] == target
    assert report1["coverage"]["fraction"] > 0.9
    print(f"\n{target}: two runs, {len(first)} bytes, sha256 {hashlib.sha256(first).hexdigest()[:16]}")
