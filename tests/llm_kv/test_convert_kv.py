"""`onnxq convert --kv-bits` on a decoder: W8A8 weights/activations plus a packed KV cache."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import onnxq

pytest.importorskip("torch")


def test_convert_decoder_with_4bit_kv_cache(tmp_path):
    from onnxq.zoo.decoders import tiny_decoder_dir

    folder = tiny_decoder_dir("llama", tmp_path / "llama")
    out = tmp_path / "llama.int8.onnx"
    result = onnxq.convert(folder, out, recipe=onnxq.Recipe(target="tensorrt", kv_bits=4))
    assert result.report["kv_cache"]["bits"] == 4
    assert result.fidelity.mean_cosine >= 0.99
    model = ir.load(out)
    kinds = {v.name: v.dtype for v in model.graph.inputs}
    assert kinds["past_key_values.0.key"] == ir.DataType.UINT8
    assert kinds["past_key_values.0.value"] == ir.DataType.UINT8
    assert "past_key_values.0.key_scale" in kinds
    with pytest.raises(onnxq.OnnxqError):
        onnxq.Recipe(kv_bits=3)
