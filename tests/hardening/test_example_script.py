"""tools/example_export.py (passes composed by hand) runs and writes a valid INT8 graph."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from onnxq.testing import op_counts, random_feeds, run

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_example_export_script_on_tiny_bert(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import onnxq
    from onnxq.targets.lint import lint
    from onnxq.targets.profiles import get_target
    from onnxq.zoo import tiny_bert_dir

    folder = tiny_bert_dir(tmp_path / "bert")
    out = tmp_path / "tiny.int8.onnx"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "example_export.py"), "--model", str(folder),
         "-o", str(out), "--samples", "32", "--seq-len", "32"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OS+: folded" in proc.stdout and "wrote" in proc.stdout
    model = onnxq.load(out)
    counts = op_counts(model)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert lint(model, get_target("tensorrt")) == []
    (y,) = run(model, random_feeds(model, batch=2, seq=8))
    assert np.isfinite(y).all()
