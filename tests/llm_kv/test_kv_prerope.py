"""RotateKV's pre-RoPE key path: k_proj fold, pre-RoPE cache, RoPE re-applied to the whole cache."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.passes._ir_utils import PASS_KEY
from onnxq.passes.kv_cache import (
    KV_CACHE_KEY,
    POSITION_RULE,
    QuantizeKVCachePass,
    apply_rotatekv,
    collect_key_samples,
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
def decoders(tmp_path_factory):
    """Exported tiny decoders, built on first use: ``decoders(kind) -> model.onnx``."""
    from onnxq.zoo.decoders import tiny_decoder_onnx

    root = tmp_path_factory.mktemp("kv_prerope")
    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = tiny_decoder_onnx(kind, root / kind)
        return cache[kind]

    return get


def _dims(model: ir.Model) -> tuple[int, int]:
    return int(model.metadata_props["onnxq.num_kv_heads"]), int(model.metadata_props["onnxq.head_dim"])


def _orders(model: ir.Model, seed: int = 0) -> dict[int, np.ndarray]:
    heads, d = _dims(model)
    rng = np.random.default_rng(seed)
    return {i: rng.permutation(heads * d) for i in range(int(model.metadata_props["onnxq.num_layers"]))}


def _k_proj(model: ir.Model, layer: int) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "MatMul"
                and n.metadata_props.get("onnxq.module") == f"model.layers.{layer}.self_attn.k_proj")


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop().producer()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return seen


def _pass_matmuls(model: ir.Model, layer: int) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "MatMul" and PASS_KEY in n.metadata_props
            and n.name.startswith(f"kvq.{layer}.key")]


# ------------------------------------------------------------------ structure
def test_structure_fold_and_rope_on_the_cache(decoders):
    path = decoders("llama")
    model = ir.load(path)
    heads, d = _dims(model)
    w0 = _k_proj(model, 0).inputs[1].const_value.numpy().copy()
    cos_before = sum(n.op_type == "Cos" for n in model.graph)
    orders = _orders(model)
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped", key_order=orders, sink_tokens=1)(model)
    keys = [s for s in result.sites if s["kind"] == "key"]
    assert result.modified and all(s["key_transform"] == "folded into k_proj" and s["rope"] for s in keys)

    # k_proj's output columns carry M = R[:, order]
    r = key_rotation_matrix(heads, d, mode="grouped")
    w = _k_proj(model, 0).inputs[1].const_value.numpy()
    np.testing.assert_allclose(w, w0 @ r[:, orders[0]], atol=1e-5)

    # no rotation MatMul on post-RoPE keys: the pass's layer-0 MatMuls see no cos/sin
    mms = _pass_matmuls(model, 0)
    assert mms and not any(n.op_type in ("Cos", "Sin") for m in mms for n in _ancestors(m.outputs[0]))

    # RoPE runs on Concat(sink, dequantized past, new) with the positions of all tokens
    attention_keys = next(n for n in model.graph if n.op_type == "Unsqueeze" and PASS_KEY not in n.metadata_props
                          and n.metadata_props.get("onnxq.module") == "model.layers.0.self_attn"
                          and n.inputs[0].producer() is not None
                          and n.inputs[0].producer().name.startswith("kvq.rope"))
    above = _ancestors(attention_keys.inputs[0])
    assert any(n.op_type == "Concat" and "cache_pre_rope" in n.name for n in above)
    assert any(n.op_type == "Concat" and "all_positions" in n.name for n in above)
    assert any(n.op_type == "Cos" and PASS_KEY in n.metadata_props for n in above)
    assert sum(n.op_type == "Cos" for n in model.graph) == cos_before + 1  # one shared copy

    config = json.loads(model.metadata_props[KV_CACHE_KEY])
    assert config["key_placement"] == "pre_rope" and config["key_transform"] == "folded into k_proj"
    assert config["rope_reapplied"] and config["rope_positions"] == POSITION_RULE


def test_post_rope_placement_still_selectable(decoders):
    model = ir.load(decoders("llama"))
    w0 = _k_proj(model, 0).inputs[1].const_value.numpy().copy()
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped", key_placement="post_rope")(model)
    assert {s["key_transform"] for s in result.sites if s["kind"] == "key"} == {"online after RoPE"}
    np.testing.assert_array_equal(_k_proj(model, 0).inputs[1].const_value.numpy(), w0)
    mms = _pass_matmuls(model, 0)  # the online rotation reads post-RoPE keys here
    assert mms and any(n.op_type == "Cos" for m in mms for n in _ancestors(m.outputs[0]))
    assert json.loads(model.metadata_props[KV_CACHE_KEY])["key_placement"] == "post_rope"


def test_qwen2_bias_fold(decoders):
    model = ir.load(decoders("qwen2"))
    add = next(n for n in model.graph if n.op_type == "Add"
               and n.metadata_props.get("onnxq.module") == "model.layers.0.self_attn.k_proj")
    bias = next(v for v in add.inputs if v.const_value is not None)
    b0 = bias.const_value.numpy().copy()
    orders = _orders(model, 1)
    QuantizeKVCachePass(bits=4, key_rotation="grouped", key_order=orders)(model)
    heads, d = _dims(model)
    m = key_rotation_matrix(heads, d, mode="grouped")[:, orders[0]]
    np.testing.assert_allclose(bias.const_value.numpy(), b0 @ m, atol=1e-6)


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "opt"])
def test_exact_without_rounding(decoders, kind):
    """quantize=False: fold, M, Mᵀ, sink and RoPE re-application reproduce FP32 logits."""
    path = decoders(kind)
    model = ir.load(path)
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped", key_order=_orders(model), sink_tokens=2,
                                 seed=3, quantize=False)(model)
    keys = [s for s in result.sites if s["kind"] == "key"]
    if kind == "qwen3":  # per-head k_norm between k_proj and RoPE: no fold
        assert all(s["key_transform"] == "online before RoPE" and "k_norm" in s["reason"] for s in keys)
        assert result.notes
    else:
        assert all(s["key_transform"] == "folded into k_proj" for s in keys)
    assert all(s["rope"] == (kind != "opt") for s in keys)
    ids = _seqs(1, 24, 5)[0]
    ref = teacher_forced_logits(DecoderSession(path, optimize=False), ids, 3)
    out = teacher_forced_logits(QuantizedKVSession(model, optimize=False), ids, 3)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_left_padding_positions(decoders):
    """Cached tokens get position_ids[:, :1] - L + arange(L): exact with left padding too."""
    path = decoders("llama")
    model = ir.load(path)
    QuantizeKVCachePass(bits=2, key_rotation="grouped", key_order=_orders(model), quantize=False)(model)
    ids = np.stack(_seqs(2, 8, 6))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    fp, q = DecoderSession(path, optimize=False), QuantizedKVSession(model, optimize=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(q.prefill(ids, mask)[real], fp.prefill(ids, mask)[real], atol=1e-4)
    for token in _seqs(1, 6, 7)[0][1:]:
        step = np.array([token, token])
        np.testing.assert_allclose(q.step(step), fp.step(step), atol=1e-4)


@pytest.mark.parametrize("kind,bits,threshold", [("llama", 4, 0.99), ("llama", 2, 0.97),
                                                 ("qwen2", 4, 0.99), ("qwen2", 2, 0.97)])
def test_teacher_forced_fidelity(decoders, kind, bits, threshold):
    path = decoders(kind)
    ids = _seqs(1, 128, 1)[0]
    ref = teacher_forced_logits(DecoderSession(path), ids, 1)
    model = ir.load(path)
    result = apply_rotatekv(model, bits=bits, calibration=_seqs(4, 64, 2), sink_tokens=1)
    assert {s["key_transform"] for s in result.sites if s["kind"] == "key"} == {"folded into k_proj"}
    assert json.loads(model.metadata_props[KV_CACHE_KEY])["key_placement"] == "pre_rope"
    out = teacher_forced_logits(QuantizedKVSession(model), ids, 1)
    assert _cos(out, ref) >= threshold


def test_generate_and_partial_cache(decoders):
    """Generation on a pre-RoPE 8-bit cache; a keys-only cache keeps FP values as exported."""
    path = decoders("llama")
    ids = _seqs(1, 8, 3)[0]
    fp = generate(DecoderSession(path), ids, 12)
    model = ir.load(path)
    apply_rotatekv(model, bits=8, calibration=_seqs(2, 32, 2), sink_tokens=1)
    assert (generate(QuantizedKVSession(model), ids, 12) == fp).mean() >= 0.9
    model = ir.load(path)
    QuantizeKVCachePass(bits=8, key_rotation="grouped", kinds=("key",))(model)
    s = QuantizedKVSession(model)
    assert (generate(s, ids, 12) == fp).mean() >= 0.9
    assert s.past["past_key_values.0.value"].shape == (1, 2, 19, 16)
    assert s.past["past_key_values.0.key"].shape == (1, 2, 19, 16)  # uint8 codes


def test_pre_rope_key_samples(decoders):
    """Calibration keys are the pre-RoPE keys (= k_proj output for llama), not the cached ones."""
    path = decoders("llama")
    model = ir.load(path)
    calib = _seqs(2, 16, 4)
    pre = collect_key_samples(model, calib, key_placement="pre_rope")
    post = collect_key_samples(model, calib, key_placement="post_rope")
    assert pre[0].shape == post[0].shape == (32, 32)
    # position 0 has no rotation: identical there, different elsewhere
    np.testing.assert_allclose(pre[0][[0, 16]], post[0][[0, 16]], atol=1e-5)
    assert not np.allclose(pre[0], post[0], atol=1e-3)


# ------------------------------------------------------------------ contract
def test_contract(decoders):
    path = decoders("llama")
    model = ir.load(path)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped", kinds=())(model)
    assert not result.modified and KV_CACHE_KEY not in model.metadata_props
    assert ir.serde.serialize_model(model).SerializeToString() == before

    result = QuantizeKVCachePass(bits=2, key_rotation="grouped")(model)
    assert result.modified
    after = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(ValueError, match="already quantized"):
        QuantizeKVCachePass(bits=2, key_rotation="grouped")(model)
    assert ir.serde.serialize_model(model).SerializeToString() == after

    with pytest.raises(ValueError, match="key_placement"):
        QuantizeKVCachePass(bits=2, key_placement="inside")


def _toy_graph(with_cache: bool) -> ir.Model:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", 2, "sequence", 16])
    if with_cache:
        past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 16])
        out = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", 16])
        nodes = [helper.make_node("Relu", ["k"], ["k_relu"]),
                 helper.make_node("Concat", ["past_key_values.0.key", "k_relu"], ["present.0.key"], axis=2)]
        graph = helper.make_graph(nodes, "toy", [past, x], [out])
    else:
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "sequence", 16])
        graph = helper.make_graph([helper.make_node("Relu", ["k"], ["y"])], "toy", [x], [out])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))


def test_graph_without_cache_untouched():
    model = _toy_graph(False)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped")(model)
    assert not result.modified
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_unsupported_key_path_is_one_clear_error():
    model = _toy_graph(True)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(ValueError, match="post_rope"):
        QuantizeKVCachePass(bits=2, key_rotation="grouped")(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before  # checked before any edit
    result = QuantizeKVCachePass(bits=2, key_rotation="grouped", key_placement="post_rope")(model)
    assert result.modified
