"""Quantized KV cache (QuantizeKVCachePass, RotateKV pieces, QuantizedKVSession) on a tiny llama."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.passes.kv_cache import (
    KV_CACHE_KEY,
    QuantizeKVCachePass,
    apply_rotatekv,
    key_rotation_matrix,
)
from onnxq.runtime import DecoderSession, generate, teacher_forced_logits
from onnxq.runtime.kv import QuantizedKVSession

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _seqs(n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, 256, length - 1)]).astype(np.int64) for _ in range(n)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from onnxq.zoo.decoders import tiny_decoder_onnx

    path = tiny_decoder_onnx("llama", tmp_path_factory.mktemp("kv") / "llama")
    ids = _seqs(1, 128, 1)[0]
    ref = teacher_forced_logits(DecoderSession(path), ids, 1)
    return path, ids, ref


def _quantized(path, **kw) -> QuantizedKVSession:
    model = ir.load(path)
    apply_rotatekv(model, calibration=_seqs(4, 64, 2), **kw)
    return QuantizedKVSession(model)


def test_graph_io_types_and_metadata(llama):
    path, _, _ = llama
    model = ir.load(path)
    result = QuantizeKVCachePass(bits=2, sink_tokens=1)(model)
    assert result.modified and len(result.sites) == 4 and not result.skipped
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    assert inputs["past_key_values.0.key"].dtype == ir.DataType.UINT8
    assert inputs["past_key_values.0.key"].shape[3] == 4  # 16 channels x 2 bits
    for part in ("scale", "zero", "sink"):
        assert inputs[f"past_key_values.1.value_{part}"].dtype == ir.DataType.FLOAT16
        assert f"present.1.value_{part}" in outputs
    assert outputs["present.0.key"].dtype == ir.DataType.UINT8
    config = json.loads(model.metadata_props[KV_CACHE_KEY])
    assert config["bits"] == 2 and config["group_size"] == 16 and config["layout"] == "append"
    ops = {n.op_type for n in model.graph}
    assert {"BitShift", "BitwiseAnd", "ReduceMin", "ReduceMax", "Round"} <= ops
    with pytest.raises(ValueError):
        QuantizeKVCachePass(bits=2)(model)


def test_rotations_are_exact_without_quantization(llama):
    """Prefill of the whole sequence reads no quantized past: logits equal FP32."""
    path, ids, _ = llama
    s = _quantized(path, bits=2, key_rotation="grouped", reorder=True, sink_tokens=1)
    fp = DecoderSession(path).prefill(ids[None])
    np.testing.assert_allclose(s.prefill(ids[None]), fp, atol=1e-3)
    r = key_rotation_matrix(2, 16, mode="grouped")
    np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-12)


@pytest.mark.parametrize("bits,threshold", [(8, 0.9999), (4, 0.99), (2, 0.97)])
def test_teacher_forced_fidelity(llama, bits, threshold):
    path, ids, ref = llama
    s = _quantized(path, bits=bits, sink_tokens=1)
    out = teacher_forced_logits(s, ids, 1)
    assert out.shape == ref.shape == (128, 256)
    assert _cos(out, ref) >= threshold


def test_cache_bytes_and_append_layout(llama):
    path, ids, _ = llama
    fp = DecoderSession(path)
    fp.prefill(ids[None, :64])
    fp_bytes = sum(a.nbytes for a in fp.past.values())
    sizes = {}
    for bits in (8, 4, 2):
        model = ir.load(path)
        QuantizeKVCachePass(bits=bits)(model)
        s = QuantizedKVSession(model)
        s.prefill(ids[None, :60])
        for t in ids[60:64]:  # decode steps append one row each
            s.step(np.array([t]))
        assert s.past["past_key_values.0.key"].shape == (1, 2, 64, 16 * bits // 8)
        assert s.past["past_key_values.0.key_scale"].shape == (1, 2, 64, 1)
        sizes[bits] = s.cache_nbytes()
    # head_dim 16, one group: codes + 2 B scale + 2 B minimum per token and head
    assert fp_bytes / sizes[8] == pytest.approx(64 / 20)
    assert fp_bytes / sizes[4] == pytest.approx(64 / 12)
    assert fp_bytes / sizes[2] == pytest.approx(64 / 8)


def test_sink_cache_and_generate(llama):
    path, ids, _ = llama
    s = _quantized(path, bits=4, rotate_values=False, key_rotation=None, reorder=False, sink_tokens=3)
    s.prefill(ids[None, :2])
    assert s.past["past_key_values.0.key_sink"].shape == (1, 2, 2, 16)
    assert s.past["past_key_values.0.key"].shape[2] == 0
    s.step(ids[2:4][None])  # one row to the sink, one quantized
    assert s.past["past_key_values.0.key_sink"].shape[2] == 3
    assert s.past["past_key_values.0.value"].shape[2] == 1
    fp = generate(DecoderSession(path), ids[:8], 12)
    q = generate(_quantized(path, bits=8, sink_tokens=1), ids[:8], 12)
    assert q.shape == fp.shape == (1, 20)
    assert (q == fp).mean() >= 0.9


def test_symmetric_variant(llama):
    path, ids, ref = llama
    model = ir.load(path)
    QuantizeKVCachePass(bits=8, symmetric=True)(model)
    assert not any(v.name.endswith("_zero") for v in model.graph.inputs)
    out = teacher_forced_logits(QuantizedKVSession(model), ids[:32], 1)
    assert _cos(out, ref[:32]) >= 0.999


def test_quantize_kv_cache_entry_point(llama):
    from onnxq.passes.kv_cache import quantize_kv_cache

    path, ids, ref = llama
    model = ir.load(path)
    result = quantize_kv_cache(model, bits=4)
    assert result.modified
    out = teacher_forced_logits(QuantizedKVSession(model), ids[:32], 1)
    assert _cos(out, ref[:32]) >= 0.99
