"""Hadamard matrices, offline residual rotation and online / per-head Hadamard passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes.hadamard import (
    SUPPORTED_BASE_ORDERS,
    hadamard_matrix,
    is_supported,
    kron_factors,
    randomized_hadamard,
    rotate_last,
)
from onnxq.passes.online_hadamard import HADAMARD_KEY, OnlineHadamardPass
from onnxq.passes.rotate_residual import ROTATED_KEY, RotateResidualPass
from onnxq.testing import op_counts, run, to_proto


# ------------------------------------------------------------------ builder
def llama_decoder(
    *,
    hidden: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 12,
    ffn: int = 80,
    layers: int = 2,
    vocab: int = 64,
    seed: int = 0,
    qkv_bias: bool = False,
    out_bias: bool = False,
    norm: str = "rms",
    massive_channel: int | None = 5,
    ffn_outlier: int | None = 7,
    positions: bool = False,
    ffn_act: str = "silu",
    opset: int = 23,
) -> ir.Model:
    """A ``layers``-block LLaMA-like decoder (no KV cache, no RoPE, no mask) built in code.

    ``input_ids [batch, seq] → Gather → [RMSNorm → q/k/v (GQA: kv_heads < heads) →
    Softmax attention → o_proj → +residual → RMSNorm → gate/up → SiLU(gate)·up →
    down_proj → +residual] × layers → RMSNorm → lm_head → logits``.

    ``massive_channel`` plants a massive residual activation (embedding column and
    the first down_proj's output column), ``ffn_outlier`` a large down_proj input
    channel (a scaled up_proj column).  ``qkv_bias`` is Qwen-style, ``out_bias``
    adds o/down biases (OPT-style writers), ``norm="layer"`` uses LayerNorm,
    ``positions`` adds a learned position table (input ``position_ids``) and
    ``ffn_act="relu"`` an OPT-style ``fc1 → Relu → fc2`` FFN.
    """
    rng = np.random.default_rng(seed)
    inits: list[ir.Value] = []
    nodes: list[ir.Node] = []

    def const(name, arr):
        arr = np.ascontiguousarray(arr)
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        return v

    def w(k, n, name, scale=1.0):
        return const(name, (scale * rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))

    def op(op_type, inputs, name, attrs=None, module="", shape=None):
        out = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(shape) if shape is not None else None)
        nodes.append(ir.node(op_type, inputs, attrs, outputs=[out], name=f"node_{name}",
                             metadata_props={"onnxq.module": module} if module else None))
        return out

    def linear(x, k, n, name, bias=False, scale=1.0, weight=None):
        wv = weight if weight is not None else w(k, n, f"{name}.weight", scale)
        y = op("MatMul", [x, wv], f"{name}_mm", module=name, shape=["batch", "seq", n])
        if bias:
            b = const(f"{name}.bias", (0.1 * rng.standard_normal(n)).astype(np.float32))
            y = op("Add", [y, b], f"{name}_out", module=name, shape=["batch", "seq", n])
        return y

    def normalize(x, name):
        g = (1.0 + 0.2 * rng.standard_normal(hidden)).astype(np.float32)
        if norm == "rms":
            return op("RMSNormalization", [x, const(f"{name}.weight", g)], name,
                      {"axis": -1, "epsilon": 1e-6}, module=name, shape=["batch", "seq", hidden])
        b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
        return op("LayerNormalization", [x, const(f"{name}.weight", g), const(f"{name}.bias", b)],
                  name, {"axis": -1, "epsilon": 1e-5}, module=name, shape=["batch", "seq", hidden])

    def i64(name, vals):
        return const(name, np.array(vals, dtype=np.int64))

    ids = ir.val("input_ids", ir.DataType.INT64, ["batch", "seq"])
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    if massive_channel is not None:
        table[:, massive_channel] += 40.0
    x = op("Gather", [const("embed_tokens.weight", table), ids], "embeds", {"axis": 0},
           module="embed_tokens", shape=["batch", "seq", hidden])
    inputs = [ids]
    if positions:
        pos = ir.val("position_ids", ir.DataType.INT64, ["batch", "seq"])
        inputs.append(pos)
        ptab = (0.5 * rng.standard_normal((32, hidden))).astype(np.float32)
        pe = op("Gather", [const("embed_positions.weight", ptab), pos], "pos_embeds",
                {"axis": 0}, module="embed_positions", shape=["batch", "seq", hidden])
        x = op("Add", [x, pe], "embeds_sum", shape=["batch", "seq", hidden])
    rep = heads // kv_heads
    for layer in range(layers):
        p = f"layers.{layer}"
        h = normalize(x, f"{p}.input_layernorm")
        q = linear(h, hidden, heads * head_dim, f"{p}.self_attn.q_proj", qkv_bias)
        k = linear(h, hidden, kv_heads * head_dim, f"{p}.self_attn.k_proj", qkv_bias)
        v = linear(h, hidden, kv_heads * head_dim, f"{p}.self_attn.v_proj", qkv_bias)
        q = op("Reshape", [q, i64(f"{p}.q_shape", [0, 0, heads, head_dim])], f"{p}.q4")
        q = op("Transpose", [q], f"{p}.qt", {"perm": [0, 2, 1, 3]})

        def kv_heads_of(t, tag):
            t = op("Reshape", [t, i64(f"{p}.{tag}_shape", [0, 0, kv_heads, head_dim])],
                   f"{p}.{tag}4")
            t = op("Transpose", [t], f"{p}.{tag}t", {"perm": [0, 2, 1, 3]})
            if rep > 1:
                t = op("Unsqueeze", [t, i64(f"{p}.{tag}_ax", [2])], f"{p}.{tag}u")
                t = op("Expand", [t, i64(f"{p}.{tag}_rep", [1, 1, rep, 1, 1])], f"{p}.{tag}e")
                t = op("Reshape", [t, i64(f"{p}.{tag}_gqa", [0, heads, -1, head_dim])],
                       f"{p}.{tag}g")
            return t

        k = kv_heads_of(k, "k")
        v = kv_heads_of(v, "v")
        kt = op("Transpose", [k], f"{p}.kT", {"perm": [0, 1, 3, 2]})
        s = op("MatMul", [q, kt], f"{p}.scores")
        s = op("Mul", [s, const(f"{p}.scale", np.array(head_dim ** -0.5, np.float32))],
               f"{p}.scores_scaled")
        a = op("Softmax", [s], f"{p}.probs", {"axis": -1})
        ctx = op("MatMul", [a, v], f"{p}.ctx")
        ctx = op("Transpose", [ctx], f"{p}.ctx_t", {"perm": [0, 2, 1, 3]})
        ctx = op("Reshape", [ctx, i64(f"{p}.ctx_shape", [0, 0, -1])], f"{p}.ctx_flat",
                 shape=["batch", "seq", heads * head_dim])
        o = linear(ctx, heads * head_dim, hidden, f"{p}.self_attn.o_proj", out_bias)
        x = op("Add", [x, o], f"{p}.resid_attn", shape=["batch", "seq", hidden])
        h = normalize(x, f"{p}.post_attention_layernorm")
        if ffn_act == "silu":
            g = linear(h, hidden, ffn, f"{p}.mlp.gate_proj", False)
        uw = rng.standard_normal((hidden, ffn)) / np.sqrt(hidden)
        if ffn_outlier is not None:
            uw[:, ffn_outlier] *= 25.0
        u = linear(h, hidden, ffn, f"{p}.mlp.up_proj",
                   weight=const(f"{p}.mlp.up_proj.weight", uw.astype(np.float32)))
        if ffn_act == "silu":
            sg = op("Sigmoid", [g], f"{p}.mlp.sig")
            silu = op("Mul", [g, sg], f"{p}.mlp.silu")
            m = op("Mul", [silu, u], f"{p}.mlp.act", shape=["batch", "seq", ffn])
        else:
            m = op("Relu", [u], f"{p}.mlp.act", shape=["batch", "seq", ffn])
        dw = rng.standard_normal((ffn, hidden)) / np.sqrt(ffn)
        if massive_channel is not None and layer == 0:
            dw[:, massive_channel] *= 30.0
        d = linear(m, ffn, hidden, f"{p}.mlp.down_proj", out_bias,
                   weight=const(f"{p}.mlp.down_proj.weight", dw.astype(np.float32)))
        x = op("Add", [x, d], f"{p}.resid_mlp", shape=["batch", "seq", hidden])
    h = normalize(x, "norm")
    logits = linear(h, hidden, vocab, "lm_head")
    logits.name = "logits"
    logits.shape = ir.Shape(["batch", "seq", vocab])
    graph = ir.Graph(inputs, [logits], nodes=nodes, initializers=inits,
                     opset_imports={"": opset}, name="tiny_llama")
    return ir.Model(graph, ir_version=10)


def _feeds(seed=0, n=2, batch=2, seq=7, vocab=64):
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    return [{"input_ids": rng.integers(0, vocab, size=(batch, seq)).astype(np.int64),
             "position_ids": pos} for _ in range(n)]


def _rel_err(ref_model, model, feeds):
    worst = 0.0
    for feed in feeds:
        (ref,) = run(ref_model, feed)
        (got,) = run(model, feed)
        worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    return worst


def _bytes(model):
    return to_proto(model).SerializeToString()


def _run_value(model, feed, name):
    """An intermediate tensor of ``model`` (added as an extra output on a proto copy)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(to_proto(model))
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return run(proto, feed, outputs=[name])[0]


def _tagged(model, key):
    return [n for n in model.graph if key in n.metadata_props]


# ----------------------------------------------------------------- matrices
@pytest.mark.parametrize("k", SUPPORTED_BASE_ORDERS)
def test_base_orders_are_hadamard(k):
    h = hadamard_matrix(k) * np.sqrt(k)
    assert np.allclose(np.abs(h), 1.0)
    np.testing.assert_allclose(h @ h.T, k * np.eye(k), atol=1e-9)


def test_model_sizes_factor_into_small_kronecker_pairs():
    assert kron_factors(11008) == (172, 64)
    assert kron_factors(5120) == (80, 64)
    assert kron_factors(13824) == (108, 128)
    assert kron_factors(4096) == (64, 64)
    for n in (11008, 5120, 13824, 4096, 14336):
        a, b = kron_factors(n)
        assert a * b == n and max(a, b) <= 224


def test_unsupported_order_raises_with_the_list():
    for n in (6, 3, 22, 4 * 47):
        assert not is_supported(n)
        with pytest.raises(ValueError, match="supported orders"):
            hadamard_matrix(n)


def test_random_signs_are_seeded_and_act_before_the_mixing():
    h = hadamard_matrix(48)
    q = randomized_hadamard(48, 7)
    np.testing.assert_array_equal(q, randomized_hadamard(48, 7))
    assert not np.array_equal(q, randomized_hadamard(48, 8))
    signs = np.diag(q @ h.T)  # q = diag(s) h
    np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-12)
    np.testing.assert_allclose(q, signs[:, None] * h, atol=1e-12)


_ORDERS = st.builds(lambda k, m: k << m,
                    st.sampled_from((1,) + SUPPORTED_BASE_ORDERS), st.integers(0, 4)).filter(
    lambda n: n <= 1024)


@settings(max_examples=40, deadline=None)
@given(n=_ORDERS, seed=st.one_of(st.none(), st.integers(0, 2**16)))
def test_hadamard_is_orthonormal_and_kronecker_exact(n, seed):
    q = hadamard_matrix(n, seed=seed)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-9)
    a, b = kron_factors(n)
    assert a * b == n
    np.testing.assert_allclose(np.kron(hadamard_matrix(a), hadamard_matrix(b)),
                               hadamard_matrix(n), atol=1e-12)
    x = np.random.default_rng(0).standard_normal((3, n))
    np.testing.assert_allclose(rotate_last(x, seed=seed), x @ q, atol=1e-9)


def _kron_graph(n: int, max_dense: int, seed) -> tuple[ir.Model, ir.Model]:
    """``y = x W`` with W [n, 5], before and after the online pass."""
    rng = np.random.default_rng(n)
    models = []
    for _ in range(2):
        x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", n])
        w = rng.standard_normal((n, 5)).astype(np.float32)
        rng = np.random.default_rng(n)
        wv = ir.Value(name="w", shape=ir.Shape([n, 5]), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(w, name="w"))
        y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(["batch", "seq", 5]))
        act = ir.Value(name="act", type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(["batch", "seq", n]))
        nodes = [ir.node("Gelu", [x], outputs=[act], name="gelu"),
                 ir.node("MatMul", [act, wv], outputs=[y], name="fc2",
                         metadata_props={"onnxq.module": "fc2"})]
        g = ir.Graph([x], [y], nodes=nodes, initializers=[wv], opset_imports={"": 21})
        models.append(ir.Model(g, ir_version=10))
    OnlineHadamardPass(max_dense=max_dense, seed=seed)(models[1])
    return models[0], models[1]


@settings(max_examples=15, deadline=None)
@given(n=_ORDERS.filter(lambda n: n >= 4), seed=st.one_of(st.none(), st.integers(0, 99)))
def test_online_kronecker_matmuls_are_exact(n, seed):
    ref, model = _kron_graph(n, max_dense=0, seed=seed)
    counts = op_counts(model)
    assert counts["MatMul"] == 3 and counts["Reshape"] == 2
    assert counts["Mul"] == (0 if seed is None else 1)
    x = np.random.default_rng(1).standard_normal((2, 3, n)).astype(np.float32)
    (want,) = run(ref, {"x": x})
    (got,) = run(model, {"x": x})
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the tensor that is quantized is x·Q
    inp = next(n_ for n_ in model.graph if n_.name == "fc2").inputs[0].name
    rotated = _run_value(model, {"x": x}, inp)
    act = _run_value(ref, {"x": x}, "act")
    np.testing.assert_allclose(rotated, act.astype(np.float64) @ hadamard_matrix(n, seed=seed),
                               atol=1e-4 * np.abs(act).max())


# ---------------------------------------------------------------- residual
CONFIGS = {
    "llama-gqa": dict(hidden=48, heads=4, kv_heads=2, head_dim=12, ffn=80),
    "qwen-bias": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, qkv_bias=True),
    "writer-bias-40": dict(hidden=40, heads=2, kv_heads=2, head_dim=20, ffn=48, out_bias=True),
    "mha-96": dict(hidden=96, heads=4, kv_heads=4, head_dim=24, ffn=160),
    "opt-ln": dict(hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=128, norm="layer",
                   qkv_bias=True, out_bias=True, positions=True, ffn_act="relu"),
}


def test_rotate_residual_structure():
    model = llama_decoder()
    before = op_counts(model)
    res = RotateResidualPass(seed=0)(model)
    assert res.modified and not res.skipped
    assert op_counts(model) == before  # weights only
    (site,) = res.sites
    assert site["hidden"] == 48 and site["embeddings"] == ["embed_tokens"]
    assert site["writers"] == [f"layers.{i}.{m}" for i in range(2)
                               for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert set(site["readers"]) == {f"layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "mlp.gate_proj", "mlp.up_proj")} | {"lm_head"}
    assert len(site["norms"]) == 5
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), 1.0)
            assert node.metadata_props[ROTATED_KEY] == "RotateResidualPass"
    assert len(_tagged(model, ROTATED_KEY)) == 1 + 5 + 11 + 4
    onnx.checker.check_model(to_proto(model), full_check=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [None, 0, 123])
def test_rotate_residual_keeps_logits(config, seed):
    ref = llama_decoder(**CONFIGS[config])
    model = llama_decoder(**CONFIGS[config])
    assert RotateResidualPass(seed=seed)(model).modified
    assert _rel_err(ref, model, _feeds()) <= 1e-4


def test_rotate_residual_spreads_the_massive_channel():
    ref = llama_decoder()
    model = llama_decoder()
    RotateResidualPass(seed=0)(model)
    feed = _feeds()[0]
    a = _run_value(ref, feed, "layers.0.resid_mlp")
    b = _run_value(model, feed, "layers.0.resid_mlp")
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1), rtol=1e-4)
    assert np.abs(b).max() < np.abs(a).max() / 3


def test_rotate_residual_converts_layernorm():
    model = llama_decoder(**CONFIGS["opt-ln"])
    res = RotateResidualPass(seed=0)(model)
    assert res.modified
    (site,) = res.sites
    assert site["layernorms_converted"] == 5
    assert site["embeddings"] == ["embed_tokens", "embed_positions"]
    counts = op_counts(model)
    assert counts["LayerNormalization"] == 0 and counts["RMSNormalization"] == 5
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            assert node.metadata_props["onnxq.pass"] == "RotateResidualPass"
    # the stream is centred then rotated: r Qᵀ has zero mean per token
    resid = _run_value(model, _feeds()[0], "layers.1.resid_mlp") @ randomized_hadamard(64, 0).T
    assert np.abs(resid.mean(-1)).max() < 1e-5 * np.abs(resid).max()
    onnx.checker.check_model(to_proto(model), full_check=True)


@pytest.mark.parametrize("kw", [dict(convert_layernorm=False), dict()])
def test_rotate_residual_refuses_layernorm_untouched(kw):
    model = llama_decoder(norm="layer", opset=22 if not kw else 23)
    blob = _bytes(model)
    res = RotateResidualPass(**kw)(model)
    assert not res.modified and _bytes(model) == blob
    (skip,) = res.skipped
    assert "LayerNormalization" in skip["reason"] and "rotation" in skip["reason"]


def test_rotate_residual_refuses_tied_embeddings_and_unmapped_graphs():
    model = llama_decoder()
    table = model.graph.initializers["embed_tokens.weight"]
    # tie: the lm_head reads the embedding table through a Transpose
    lm = next(n for n in model.graph if n.name == "node_lm_head_mm")
    out = ir.Value(name="embed_T", type=ir.TensorType(ir.DataType.FLOAT))
    tr = ir.node("Transpose", [table], {"perm": [1, 0]}, outputs=[out], name="tie")
    model.graph.insert_before(lm, tr)
    old = lm.inputs[1]
    lm.replace_input_with(1, out)
    model.graph.initializers.pop(old.name)
    blob = _bytes(model)
    res = RotateResidualPass()(model)
    assert not res.modified and _bytes(model) == blob
    assert "shared" in res.skipped[0]["reason"] or "not a linear" in res.skipped[0]["reason"]
    # a graph without a residual stream
    enc = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 4] x) => (float[2, 4] y) { y = Relu(x) }""")
    enc = ir.serde.deserialize_model(enc)
    blob = _bytes(enc)
    res = RotateResidualPass()(enc)
    assert not res.modified and _bytes(enc) == blob and res.skipped


def test_rotate_residual_is_idempotent_via_marks():
    model = llama_decoder()
    assert RotateResidualPass(seed=0)(model).modified
    blob = _bytes(model)
    res = RotateResidualPass(seed=0)(model)
    assert not res.modified and _bytes(model) == blob
    assert "already rotated" in res.skipped[0]["reason"]


# ------------------------------------------------------------------ online
def test_online_down_proj_structure():
    model = llama_decoder(ffn=80)
    before = op_counts(model)
    res = OnlineHadamardPass(targets="down_proj", seed=3, max_dense=16)(model)
    assert res.modified and not res.skipped
    assert [s["module"] for s in res.sites] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert all(s["factors"] == (20, 4) for s in res.sites)
    added = op_counts(model)
    added.subtract(before)
    assert +added == {"MatMul": 4, "Reshape": 4, "Mul": 2}
    for node in model.graph:
        if node.metadata_props.get("onnxq.pass") == "OnlineHadamardPass":
            assert node.metadata_props["onnxq.module"].endswith("mlp.down_proj.online_hadamard")
    down = next(n for n in model.graph if n.name == "node_layers.0.mlp.down_proj_mm")
    assert down.inputs[0].producer().op_type == "Reshape"
    assert down.metadata_props[HADAMARD_KEY] == "OnlineHadamardPass"
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_online_dense_variant_is_one_matmul():
    model = llama_decoder(ffn=48)
    before = op_counts(model)
    OnlineHadamardPass(targets=["*.mlp.down_proj"])(model)
    added = op_counts(model)
    added.subtract(before)
    assert +added == {"MatMul": 2}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kw", [dict(targets="down_proj"),
                                dict(targets="down_proj", seed=5, max_dense=8),
                                dict(targets="attention_out", seed=2),
                                dict(targets=("down_proj", "attention_out"), seed=1, max_dense=8)])
def test_online_hadamard_keeps_logits(config, kw):
    ref = llama_decoder(**CONFIGS[config])
    model = llama_decoder(**CONFIGS[config])
    res = OnlineHadamardPass(**kw)(model)
    assert res.modified and not res.skipped
    assert _rel_err(ref, model, _feeds()) <= 1e-4
    # and composes with the residual rotation
    assert RotateResidualPass(seed=0)(model).modified
    assert _rel_err(ref, model, _feeds()) <= 1e-4


def test_attention_variant_adds_no_nodes_and_spreads_v():
    model = llama_decoder(qkv_bias=True)
    before = op_counts(model)
    res = OnlineHadamardPass(targets="attention_out")(model)
    assert op_counts(model) == before
    assert [(s["v_proj"], s["o_proj"], s["head_dim"]) for s in res.sites] == [
        (f"layers.{i}.self_attn.v_proj", f"layers.{i}.self_attn.o_proj", 12) for i in range(2)]
    assert len(_tagged(model, HADAMARD_KEY)) == 4


def test_online_contract_no_match_and_idempotent():
    model = llama_decoder()
    blob = _bytes(model)
    res = OnlineHadamardPass(targets="*.no_such_module")(model)
    assert not res.modified and _bytes(model) == blob
    res = OnlineHadamardPass(targets=("down_proj", "attention_out"), seed=1)(model)
    assert res.modified
    blob = _bytes(model)
    res = OnlineHadamardPass(targets=("down_proj", "attention_out"), seed=1)(model)
    assert not res.modified and _bytes(model) == blob


def test_online_unsupported_size_is_skipped_with_reason():
    model = llama_decoder(ffn=46)  # 46 = 2·23: no Hadamard matrix
    blob = _bytes(model)
    res = OnlineHadamardPass(targets="down_proj")(model)
    assert not res.modified and _bytes(model) == blob
    assert all("order 46" in s["reason"] for s in res.skipped) and len(res.skipped) == 2


# ------------------------------------------------------------------- W8A8
def w8a8_logits_error(config: dict, *, rotate: bool, online: bool, seed: int = 0) -> float:
    """Mean relative L2 error of the logits of the TensorRT W8A8 QDQ graph vs FP32."""
    import onnx_ir.passes.common as common_passes

    from onnxq.calibration.runner import calibrate
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.targets.profiles import get_target

    ref = llama_decoder(**config)
    model = llama_decoder(**config)
    if rotate:
        assert RotateResidualPass(seed=seed)(model).modified
    if online:
        targets = ("down_proj", "attention_out")
        assert OnlineHadamardPass(targets=targets, seed=seed + 1)(model).modified
    common_passes.ShapeInferencePass()(model)
    stats = calibrate(model, _feeds(seed=1, n=8, batch=4, seq=16))
    InsertQDQPass(stats=stats, target=get_target("tensorrt"),
                  keep_fp=["*.online_hadamard"])(model)
    errs = []
    for feed in _feeds(seed=2, n=4, batch=4, seq=16):
        (a,) = run(ref, feed)
        (b,) = run(model, feed)
        errs.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    return float(np.mean(errs))


@pytest.mark.parametrize("config", ["llama-gqa", "opt-ln"])
def test_rotation_lowers_w8a8_error_with_a_massive_channel(config):
    plain = w8a8_logits_error(CONFIGS[config], rotate=False, online=False)
    rotated = w8a8_logits_error(CONFIGS[config], rotate=True, online=True)
    assert rotated < 0.75 * plain
