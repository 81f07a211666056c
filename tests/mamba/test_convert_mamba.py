"""`onnxq convert` on a Mamba model goes through the Quamba recipe end to end."""

from __future__ import annotations

import pytest

import onnxq
from onnxq.targets.lint import lint, linear_weight_coverage

pytest.importorskip("torch")


def test_convert_tiny_mamba_end_to_end(tmp_path):
    from onnxq.zoo.mamba import tiny_mamba_dir

    folder = tiny_mamba_dir(tmp_path / "mamba")
    out = tmp_path / "mamba.int8.onnx"
    result = onnxq.convert(folder, out, recipe=onnxq.Recipe(target="tensorrt"))
    fid = result.fidelity
    assert fid.output == "logits" and fid.samples == 4 * 64
    assert fid.mean_cosine >= 0.99
    model = onnxq.load(out)
    assert lint(model, "tensorrt") == []
    q, total = linear_weight_coverage(model)
    assert q == total  # every linear layer is INT8; the Hadamard MatMuls are not layers
    assert result.report["outliers"]["methods"] == ["quamba-hadamard"]
    plain = onnxq.convert(folder, None, recipe=onnxq.Recipe(target="tensorrt", outliers=("none",)))
    assert plain.fidelity.mean_cosine < fid.mean_cosine
