"""onnxq.torch: clipped softmax, gated attention, patch(), LSQ QAT and its QDQ export."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxq.torch import (  # noqa: E402
    ClippedSoftmax,
    GatedAttention,
    LSQQuantizer,
    export_module,
    export_qdq,
    fake_quant_weight,
    learned_scales,
    patch,
    prepare_qat,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from onnxq.zoo.bert import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("tiny"), hidden=64, layers=2, heads=4,
                         intermediate=128, vocab=128, outliers=True)


def _load(folder):
    return transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()


def _inputs(batch=3, seq=9, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _feeds(n=3, batch=4, seq=12, vocab=128):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, seq - 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


# ----------------------------------------------------------------------- clipped softmax


def test_clipped_softmax_identity_settings_equal_softmax():
    x = torch.randn(4, 5, 7) * 3
    y = ClippedSoftmax(zeta=1.0, gamma=0.0)(x)
    assert torch.equal(y, torch.softmax(x, dim=-1))


def test_clipped_softmax_reaches_exact_zero_and_one():
    x = torch.tensor([[10.0, 0.0, -3.0, -3.0]])
    y = ClippedSoftmax(zeta=1.03, gamma=-0.03)(x)
    assert float(y[0, 0]) == 1.0  # exact 1 with zeta > 1 from finite logits
    assert float(y[0, 2]) == 0.0 and float(y[0, 3]) == 0.0  # exact 0 with gamma < 0
    y = ClippedSoftmax(gamma=-0.025)(torch.randn(64, 32) * 4)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert (y == 0).any()
    with pytest.raises(ValueError):
        ClippedSoftmax(zeta=0.5)


def test_gated_attention_shapes_and_init():
    for kind in ("linear", "mlp", "linear_all"):
        gate = GatedAttention(4, 16, kind=kind, pi_init=0.25)
        g = gate(torch.randn(2, 5, 64))
        assert g.shape == (2, 5, 4)
        assert torch.allclose(g, torch.full_like(g, 0.25), atol=0.08)


# ----------------------------------------------------------------------- patch()


def test_patch_identity_keeps_outputs_and_defaults_change_them(tiny_dir):
    inputs = _inputs()
    ref = _load(tiny_dir)
    with torch.no_grad():
        expected = ref(**inputs).last_hidden_state
    for method, kw in (("none", {}), ("clipped", {"zeta": 1.0, "gamma": 0.0})):
        m = patch(_load(tiny_dir), method, **kw)
        assert m.config._attn_implementation == "onnxq"
        with torch.no_grad():
            torch.testing.assert_close(m(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    # gate with zero weights and scale 1/pi_init is an identity too
    m = patch(_load(tiny_dir), "gated", gate="linear", pi_init=0.25, gate_scale=4.0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, GatedAttention):
                mod.w1.zero_()
        torch.testing.assert_close(m(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    for method in ("clipped", "gated", "clipped+gated"):
        m = patch(_load(tiny_dir), method)
        with torch.no_grad():
            out = m(**inputs).last_hidden_state
        assert (out - expected).abs().max() > 1e-3, method
    with pytest.raises(ValueError):
        patch(_load(tiny_dir), "bogus")


def test_patched_export_keeps_clip_and_gate_patterns(tiny_dir):
    from onnxq._api import prepare

    m = patch(_load(tiny_dir), "clipped+gated", gamma=-0.025)
    graph = export_module(m)  # also checks onnxruntime against PyTorch
    prepare(graph)
    chains = 0
    for node in graph.graph:
        if node.op_type != "Softmax":
            continue
        mul = [u.node for u in node.outputs[0].uses()]
        assert [n.op_type for n in mul] == ["Mul"]
        add = [u.node for u in mul[0].outputs[0].uses()]
        assert [n.op_type for n in add] == ["Add"]
        clip = [u.node for u in add[0].outputs[0].uses()]
        assert [n.op_type for n in clip] == ["Clip"]
        chains += 1
    assert chains == 2
    assert sum(n.op_type == "Sigmoid" for n in graph.graph) == 2
    # the gate MatMuls (3-D weights) are not mistaken for linear layers
    from onnxq.passes._patterns import find_linears

    assert all("onnxq_gate" not in u.module for u in find_linears(graph.graph))


# ----------------------------------------------------------------------- QAT


def test_lsq_gradients_flow():
    q = LSQQuantizer(0.1)
    x = torch.tensor([0.03, -0.26, 5.0, -20.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y.detach(), torch.tensor([0.0, -0.3, 5.0, -12.8]), atol=1e-6)
    y.sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad) != 0.0
    # straight-through inside the grid, zero outside
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_fake_quant_weight_matches_insert_qdq():
    from onnxq.passes.insert_qdq import quantize_weight_blocked_int4, quantize_weight_per_channel

    w = torch.randn(24, 128)
    q, s = quantize_weight_blocked_int4(w.numpy().T.copy(), 64)
    ref4 = (q.astype(np.float32) * np.repeat(s, 64, axis=0)).T
    np.testing.assert_allclose(fake_quant_weight(w, 4, 64).numpy(), ref4, rtol=1e-6, atol=1e-7)
    q, s = quantize_weight_per_channel(w.numpy().T.copy())
    np.testing.assert_allclose(fake_quant_weight(w, 8).numpy(), (q * s).T, rtol=1e-6, atol=1e-7)
    w.requires_grad_(True)
    fake_quant_weight(w, 4, 64).sum().backward()
    assert torch.all(w.grad == 1)


def test_qat_export_uses_learned_scales_and_matches_torch(tiny_dir):
    import onnxruntime as ort
    import onnx_ir as ir

    from onnxq.passes.insert_qdq import PASS_TAG

    model = _load(tiny_dir)
    prepare_qat(model, feeds=_feeds(), weight_bits=4, block_size=64,
                hadamard="*.output.dense", quantize_attention=True)
    quantizers = {m.tensor: m for m in model.modules() if isinstance(m, LSQQuantizer)}
    assert len(quantizers) == 2 * 8  # per layer: qkv input, o, fc1, fc2 (rotated), q, k, p, v
    # one learning step moves the scales; then set one explicitly
    out = model(**_inputs()).last_hidden_state
    out.pow(2).mean().backward()
    assert all(q.scale.grad is not None for q in quantizers.values() if q.scale.requires_grad)
    name, quant = next(iter(quantizers.items()))
    with torch.no_grad():
        quant.scale.mul_(1.37)
    learned = learned_scales(model)

    graph, result = export_qdq(model, feeds=_feeds())
    q_scales = {}
    for node in graph.graph:
        if node.op_type == "QuantizeLinear" and node.metadata_props.get("onnxq.pass") == PASS_TAG:
            q_scales[node.inputs[0].name] = float(node.inputs[1].const_value.numpy())
    assert set(learned) <= set(q_scales)
    for tensor, scale in learned.items():
        assert q_scales[tensor] == pytest.approx(scale, rel=1e-6), tensor
    assert q_scales[name] == pytest.approx(learned[name], rel=1e-6)
    # HALO: online rotations inserted and kept in floating point; int4 blocked weights
    assert any(n.metadata_props.get("onnxq.pass") == "OnlineHadamardPass" for n in graph.graph)
    assert any(n.op_type == "DequantizeLinear" and n.attributes.get_int("block_size", 0) == 64
               for n in graph.graph)

    # The QDQ graph computes what the fake-quantized torch model computes.
    inputs = _inputs(batch=2, seq=10)
    with torch.no_grad():
        fq = model(**inputs).last_hidden_state.numpy()
        from onnxq.torch import float_copy

        fp = float_copy(model)(**inputs).last_hidden_state.numpy()
    sess = ort.InferenceSession(ir.serde.serialize_model(graph).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    err_fq = np.abs(got - fq).mean()
    err_fp = np.abs(got - fp).mean()
    assert err_fq < 0.25 * err_fp, (err_fq, err_fp)
