"""PerEmbeddingGroupPass, contiguous (Split) layout: the producer's channels are permuted
offline into the group order so one Split replaces the G channel Gathers (issue #4)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from onnxq.calibration.runner import calibrate, default_tensors
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.peg import PEG_KEY, PERM_KEY, PerEmbeddingGroupPass, peg_groups
from onnxq.targets.profiles import get_target
from onnxq.testing import encoder_block_model, op_counts, random_feeds, run, to_proto

TAG = "PerEmbeddingGroupPass"
HIDDEN, WIDTH, OUT = 8, 14, 6
OUTLIER = 5  # channel of the activation with the planted outlier


# ------------------------------------------------------------------ helpers
def _chain_model(chain=(("Add", "bias"), ("Gelu",)), *, consumers=1, reader=False,
                 leak=None, seed=0, x_is_act=False, opset=21) -> ir.Model:
    """``x -> MatMul(up.weight) -> chain -> act -> consumers x linear``.

    ``chain`` items: ``(op,)`` for a unary op, ``(op, "bias"|"scale"|"scalar")`` for a
    binary op with a per-channel (bias/scale) or scalar constant; ``("FastGelu",)`` is the
    com.microsoft op with a bias input.  ``reader`` adds ``Mul(act, act)`` as another
    reader of ``act``; ``leak`` makes the chain value with that index a graph output;
    ``x_is_act`` makes the linears read the graph input directly.  Column ``OUTLIER`` of
    ``up.weight`` is scaled up, so ``act`` has an outlier channel.
    """
    rng = np.random.default_rng(seed)
    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", HIDDEN])
    inits, nodes, outs = [], [], []

    def const(name, arr):
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        return v

    def val(name, width):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                        shape=ir.Shape(["batch", "seq", width]))

    if x_is_act:
        act = x
        width = HIDDEN
    else:
        width = WIDTH
        w_up = (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32)
        w_up[:, OUTLIER] *= 30.0
        v = val("up_mm", WIDTH)
        nodes.append(ir.node("MatMul", [x, const("up.weight", w_up)], outputs=[v],
                             name="node_up_mm", metadata_props={"onnxq.module": "up"}))
        chain_vals = [v]
        for i, item in enumerate(chain):
            op, kind = item[0], (item[1] if len(item) > 1 else None)
            out = val(f"chain{i}", WIDTH)
            inputs, domain = [v], ""
            if kind == "bias":
                inputs.append(const(f"c{i}.bias", (0.3 * rng.standard_normal(WIDTH)).astype(np.float32)))
            elif kind == "scale":
                inputs.append(const(f"c{i}.scale", rng.uniform(0.5, 2.0, (1, 1, WIDTH)).astype(np.float32)))
            elif kind == "scalar":
                inputs.append(const(f"c{i}.scalar", np.array(0.7, np.float32)))
            if op == "FastGelu":
                domain = "com.microsoft"
                inputs.append(const(f"c{i}.bias", (0.3 * rng.standard_normal(WIDTH)).astype(np.float32)))
            nodes.append(ir.node(op, inputs, domain=domain, outputs=[out], name=f"node_chain{i}"))
            v = out
            chain_vals.append(v)
        act = v
        act.name = "act"
        if leak is not None:
            outs.append(chain_vals[leak])
    for c in range(consumers):
        w = (rng.standard_normal((width, OUT)) / np.sqrt(width)).astype(np.float32)
        mm = val(f"lin{c}_mm", OUT)
        nodes.append(ir.node("MatMul", [act, const(f"lin{c}.weight", w)], outputs=[mm],
                             name=f"node_lin{c}_mm", metadata_props={"onnxq.module": f"lin{c}"}))
        out = val(f"lin{c}_out", OUT)
        nodes.append(ir.node("Add", [mm, const(f"lin{c}.bias", (0.1 * rng.standard_normal(OUT)).astype(np.float32))],
                             outputs=[out], name=f"node_lin{c}_out"))
        outs.append(out)
    if reader:
        sq = val("act_sq", width)
        nodes.append(ir.node("Mul", [act, act], outputs=[sq], name="node_act_sq"))
        outs.append(sq)
    opsets = {"": opset, "com.microsoft": 1} if any(c[0] == "FastGelu" for c in chain) else {"": opset}
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits, opset_imports=opsets,
                     name="chain")
    return ir.Model(graph, ir_version=10)


def _feeds(seed, n=3, batch=2, seq=8, width=HIDDEN, x_outlier=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((batch, seq, width)).astype(np.float32)
        if x_outlier:  # for linears reading x directly
            x[..., OUTLIER] = 8.0 + 30.0 * x[..., OUTLIER]
        out.append({"x": x})
    return out


def _rel_err(ref_model, model, feeds):
    worst = 0.0
    for feed in feeds:
        for ref, got in zip(run(ref_model, feed), run(model, feed), strict=True):
            worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    return worst


def _taps(model, names, feed):
    """Values ``names`` of ``model`` (a copy with them as extra graph outputs) on ``feed``."""
    m = model.clone()
    values = {o.name: o for n in m.graph for o in n.outputs}
    for name in names:
        if not values[name].is_graph_output():
            m.graph.outputs.append(values[name])
    return run(m, feed, outputs=names)


def _bytes(model):
    return to_proto(model).SerializeToString()


def _init(model, name):
    return model.graph.initializers[name].const_value.numpy()


def _site(res, tensor):
    (site,) = [s for s in res.sites if s["tensor"] == tensor]
    return site


# ---------------------------------------------------------------- structure
def test_structure_split_and_permutation():
    ref = _chain_model()
    model = _chain_model()
    stats = calibrate(model, _feeds(1))
    w_up, b_up, w_lin = _init(model, "up.weight"), _init(model, "c0.bias"), _init(model, "lin0.weight")
    before = op_counts(model)
    res = PerEmbeddingGroupPass(stats=stats, groups=4)(model)
    assert res.modified
    site = _site(res, "act")
    assert site["layout"] == "split" and "layout_reason" not in site
    assert site["permuted"] == ["c0.bias", "up.weight"]  # edited in place, names kept
    assert site["group_sizes"] == [4, 4, 3, 3] and OUTLIER in site["widest_group"]
    assert site["nodes_added"] == 1 + 3 + 1  # Split, 3 extra MatMuls, Sum
    after = op_counts(model)
    after.subtract(before)
    assert +after == collections.Counter({"Split": 1, "MatMul": 3, "Sum": 1})
    assert op_counts(model)["Gather"] == 0

    parts = peg_groups(stats["act"].ch_min, stats["act"].ch_max, 4)
    perm = np.concatenate(parts)
    # producer: columns of W_up and the bias permuted into the group order
    np.testing.assert_array_equal(_init(model, "up.weight"), w_up[:, perm])
    np.testing.assert_array_equal(_init(model, "c0.bias"), b_up[perm])
    # the moved nodes say how to undo the permutation; nothing else is marked
    marked = sorted(n.name for n in model.graph if PERM_KEY in n.metadata_props)
    assert marked == ["node_chain0", "node_chain1", "node_up_mm"]
    for name in marked:
        assert model.graph.node(name).metadata_props[PERM_KEY] == ",".join(map(str, perm))
    assert "onnxq.pass" not in model.graph.node("node_up_mm").metadata_props
    feed = _feeds(8)[0]
    names = ["up_mm", "chain0", "act"]
    for a, b in zip(_taps(ref, names, feed), _taps(model, names, feed), strict=True):
        np.testing.assert_allclose(b, a[..., perm], rtol=1e-6, atol=1e-6)
    # one Split (axis -1, explicit sizes) of the permuted activation
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert split.name == "act_peg_Split" and split.inputs[0].name == "act"
    assert split.attributes.get_int("axis") == -1
    assert split.inputs[1].name == "act_peg_split"
    assert split.inputs[1].const_value.numpy().tolist() == site["group_sizes"]
    assert [o.name for o in split.outputs] == [f"act_peg{g}" for g in range(4)]
    assert split.metadata_props["onnxq.pass"] == TAG
    assert split.metadata_props["onnxq.module"] == "lin0"
    assert [o.shape[-1] for o in split.outputs] == site["group_sizes"]
    # consumer: weight rows follow the same permutation, one slice per group
    for g, out in enumerate(split.outputs):
        (use,) = out.uses()
        mm = use.node
        assert mm.op_type == "MatMul" and mm.name == f"node_lin0_mm_peg{g}"
        assert mm.metadata_props[PEG_KEY] == TAG and mm.metadata_props["onnxq.module"] == "lin0"
        np.testing.assert_array_equal(mm.inputs[1].const_value.numpy(), w_lin[parts[g]])
    np.testing.assert_array_equal(
        np.concatenate([_init(model, f"lin0.weight_peg{g}") for g in range(4)]), w_lin[perm])
    (total,) = [n for n in model.graph if n.op_type == "Sum"]
    assert total.outputs[0].name == "lin0_mm" and total.name == "node_lin0_mm_peg_Sum"
    assert _rel_err(ref, model, _feeds(7)) <= 1e-5
    onnx.checker.check_model(to_proto(model), full_check=True)


@pytest.mark.parametrize("chain", [
    (("Add", "bias"), ("Relu",), ("Mul", "scale"), ("Mul", "scalar")),
    (("Mul", "scale"), ("Sub", "bias"), ("Tanh",), ("Div", "scalar"), ("Mul", "bias")),
    (("FastGelu",),),
    (),  # the activation is the MatMul output itself
], ids=["relu-scale", "sub-div", "fastgelu", "matmul"])
@pytest.mark.parametrize("consumers", [1, 3])
def test_chains_fp32_equivalent(chain, consumers):
    ref = _chain_model(chain, consumers=consumers)
    model = _chain_model(chain, consumers=consumers)
    consts = {n: _init(model, n) for n in model.graph.initializers
              if n.startswith("c") and _init(model, n).size > 1}
    stats = calibrate(model, _feeds(1), tensors=["act"])
    res = PerEmbeddingGroupPass(stats=stats, groups=3, min_outlier_ratio=0.0)(model)
    site = _site(res, "act")
    assert site["layout"] == "split"
    assert sorted(site["permuted"]) == sorted([*consts, "up.weight"])
    assert not any("scalar" in name for name in site["permuted"])
    counts = op_counts(model)
    assert counts["Split"] == 1 and counts["Gather"] == 0
    assert counts["Sum"] == consumers and counts["MatMul"] == 1 + 3 * consumers
    perm = np.concatenate(peg_groups(stats["act"].ch_min, stats["act"].ch_max, 3))
    for name, arr in consts.items():  # per-channel constants follow the channels
        np.testing.assert_array_equal(_init(model, name), arr[..., perm])
    assert _rel_err(ref, model, _feeds(5)) <= 1e-5


def test_old_opset_split_attribute():
    """Before opset 13 the split sizes are an attribute of Split."""
    chain = (("Add", "bias"), ("Relu",))
    ref, model = _chain_model(chain, opset=12), _chain_model(chain, opset=12)
    res = PerEmbeddingGroupPass(stats=calibrate(model, _feeds(1), tensors=["act"]), groups=4)(model)
    assert _site(res, "act")["layout"] == "split"
    split = model.graph.node("act_peg_Split")
    assert len(split.inputs) == 1
    assert list(split.attributes["split"].value) == _site(res, "act")["group_sizes"]
    assert _rel_err(ref, model, _feeds(2)) <= 1e-5
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_shared_constant_is_copied():
    """A chain constant read elsewhere too gets a permuted copy; the other reader keeps it."""
    ref = _chain_model((("Add", "bias"), ("Gelu",)))
    model = _chain_model((("Add", "bias"), ("Gelu",)))
    for m in (ref, model):  # a second reader of c0.bias outside the chain
        g = m.graph
        out = ir.Value(name="bias_twice", type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape([WIDTH]))
        g.append(ir.node("Add", [g.initializers["c0.bias"], g.initializers["c0.bias"]],
                         outputs=[out], name="node_bias_twice"))
        g.outputs.append(out)
    b = _init(model, "c0.bias")
    stats = calibrate(model, _feeds(1))
    res = PerEmbeddingGroupPass(stats=stats, groups=4)(model)
    site = _site(res, "act")
    assert site["layout"] == "split" and site["permuted"] == ["c0.bias_peg_perm", "up.weight"]
    np.testing.assert_array_equal(_init(model, "c0.bias"), b)  # untouched
    assert model.graph.node("node_chain0").inputs[1].name == "c0.bias_peg_perm"
    assert _rel_err(ref, model, _feeds(4)) <= 1e-5


def test_encoder_block_fc1_gather_fc2_split():
    """fc1 reads the LayerNorm output (also the residual): Gather; fc2 reads
    Gelu(fc1): Split, with the permutation applied to every partial fc1 weight."""
    ref = encoder_block_model()
    model = encoder_block_model()
    for m in (ref, model):
        w = m.graph.initializers["fc1.weight"]
        arr = w.const_value.numpy().copy()
        arr[:, 5] *= 25.0
        w.const_value = ir.tensor(arr, name=w.name)
        common_passes.ShapeInferencePass()(m)
    stats = calibrate(model, _feeds(1, width=16))
    res = PerEmbeddingGroupPass(stats=stats)(model)
    fc1, fc2 = _site(res, "ln1"), _site(res, "gelu")
    assert fc1["layout"] == "gather" and "read by Add node_residual" in fc1["layout_reason"]
    assert fc2["layout"] == "split"
    assert fc2["permuted"] == ["fc1.bias", *(f"fc1.weight_peg{g}" for g in range(6))]
    marked = sorted(n.name for n in model.graph if PERM_KEY in n.metadata_props)
    assert marked == sorted(["node_fc1_out", "node_gelu", "node_fc1_mm_peg_Sum",
                             *(f"node_fc1_mm_peg{g}" for g in range(6))])
    counts = op_counts(model)
    assert counts["Gather"] == 6 and counts["Split"] == 1 and counts["Sum"] == 2
    assert fc1["nodes_added"] == 6 + 5 + 1 and fc2["nodes_added"] == 1 + 5 + 1
    assert _rel_err(ref, model, _feeds(3, width=16)) <= 1e-5
    onnx.checker.check_model(to_proto(model), full_check=True)


# ----------------------------------------------------------------- fallback
@pytest.mark.parametrize("case,kw,reason", [
    ("graph input", dict(x_is_act=True), "graph input"),
    ("other reader", dict(reader=True), "also read by Mul"),
    ("leaky chain", dict(leak=1), "other readers"),
    ("act is output", dict(leak=2), "graph output"),
    ("not elementwise", dict(chain=(("Add", "bias"), ("Softmax",))), "Softmax"),
])
def test_fallback_to_gather(case, kw, reason):
    ref = _chain_model(**kw)
    model = _chain_model(**kw)
    consts = {n: _init(model, n) for n in model.graph.initializers}
    tensor = "x" if kw.get("x_is_act") else "act"
    stats = calibrate(model, _feeds(1, x_outlier=True), tensors=[tensor])
    res = PerEmbeddingGroupPass(stats=stats, groups=4, min_outlier_ratio=2.0)(model)
    site = _site(res, tensor)
    assert site["layout"] == "gather" and reason in site["layout_reason"]
    assert "permuted" not in site
    counts = op_counts(model)
    assert counts["Gather"] == 4 and counts["Split"] == 0
    for name, arr in consts.items():  # no partial permutation left behind
        if name in model.graph.initializers:
            np.testing.assert_array_equal(_init(model, name), arr)
    assert "up.weight" in model.graph.initializers or kw.get("x_is_act")
    assert _rel_err(ref, model, _feeds(2, x_outlier=True)) <= 1e-5


def test_fallback_chain_from_layernorm_keeps_constants():
    """``Gelu(Add(LN(x), b))``: the bias edit is planned, then refused at the
    LayerNorm output (read by the residual too): the bias must stay as it was."""
    model = encoder_block_model()
    g = model.graph
    ln1 = g.node("node_ln1")
    b = ir.Value(name="pre.bias", shape=ir.Shape([16]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.linspace(-1, 1, 16, dtype=np.float32), name="pre.bias"))
    g.register_initializer(b)
    added = ir.Value(name="pre_add", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(["batch", "seq", 16]))
    act = ir.Value(name="pre_act", type=ir.TensorType(ir.DataType.FLOAT),
                   shape=ir.Shape(["batch", "seq", 16]))
    fc1 = g.node("node_fc1_mm")
    g.insert_after(ln1, [ir.node("Add", [ln1.outputs[0], b], outputs=[added], name="node_pre_add"),
                         ir.node("Relu", [added], outputs=[act], name="node_pre_act")])
    fc1.replace_input_with(0, act)
    stats = calibrate(model, _feeds(1, width=16))
    res = PerEmbeddingGroupPass(stats=stats, producers=("Relu",))(model)
    site = _site(res, "pre_act")
    assert site["layout"] == "gather" and "ln1" in site["layout_reason"]
    np.testing.assert_array_equal(_init(model, "pre.bias"), np.linspace(-1, 1, 16, dtype=np.float32))


def test_contiguous_false_keeps_gather():
    model = _chain_model()
    stats = calibrate(model, _feeds(1))
    w_up = _init(model, "up.weight")
    res = PerEmbeddingGroupPass(stats=stats, groups=4, contiguous=False)(model)
    site = _site(res, "act")
    assert site["layout"] == "gather" and site["layout_reason"] == "contiguous layout disabled"
    assert op_counts(model)["Gather"] == 4
    np.testing.assert_array_equal(_init(model, "up.weight"), w_up)


# ----------------------------------------------------------------- contract
def test_no_outlier_untouched():
    model = _chain_model()
    w = model.graph.initializers["up.weight"]
    arr = w.const_value.numpy().copy()
    arr[:, OUTLIER] /= 30.0
    w.const_value = ir.tensor(arr, name=w.name)
    stats = calibrate(model, _feeds(1), tensors=["act"])
    blob = _bytes(model)
    res = PerEmbeddingGroupPass(stats=stats, groups=4, min_outlier_ratio=50.0)(model)
    assert not res.modified and not res.sites
    assert {s["tensor"]: s["reason"] for s in res.skipped} == {
        "x": "no statistics", "act": res.skipped[1]["reason"]}
    assert "outlier ratio" in res.skipped[1]["reason"]
    assert _bytes(model) == blob


@pytest.mark.parametrize("consumers", [1, 2])
def test_idempotent_split(consumers):
    ref = _chain_model(consumers=consumers)
    model = _chain_model(consumers=consumers)
    stats = calibrate(model, _feeds(1))
    # every linear is a site: x (graph input) -> Gather, act (up is split by then) -> Split
    res = PerEmbeddingGroupPass(stats=stats, groups=4, min_outlier_ratio=0.0)(model)
    assert [(s["tensor"], s["layout"]) for s in res.sites] == [("x", "gather"), ("act", "split")]
    assert _site(res, "act")["permuted"] == ["c0.bias", *(f"up.weight_peg{g}" for g in range(4))]
    blob = _bytes(model)
    for s in (stats, calibrate(model, _feeds(1))):
        again = PerEmbeddingGroupPass(stats=s, groups=4, min_outlier_ratio=0.0)(model)
        assert not again.modified and _bytes(model) == blob
        assert any(x["reason"] == "already split" for x in again.skipped)
    assert _rel_err(ref, model, _feeds(3)) <= 1e-5


def test_deterministic():
    a, b = _chain_model(consumers=2), _chain_model(consumers=2)
    for m in (a, b):
        PerEmbeddingGroupPass(stats=calibrate(m, _feeds(1)), groups=4)(m)
    assert _bytes(a) == _bytes(b)


def test_calibration_and_qdq_see_the_split_outputs():
    model = _chain_model(consumers=2)
    cal = _feeds(1)
    PerEmbeddingGroupPass(stats=calibrate(model, cal), groups=4)(model)
    groups = [f"act_peg{g}" for g in range(4)]
    assert default_tensors(model) == ["x", *groups]
    qres = InsertQDQPass(stats=calibrate(model, cal), target=get_target("tensorrt"))(model)
    assert [a.name for a in qres.activations] == ["x", *groups]
    assert len(qres.weights) == 1 + 2 * 4
    split = model.graph.node("act_peg_Split")
    for out in split.outputs:  # Split -> one QuantizeLinear per group tensor
        assert [u.node.op_type for u in out.uses()] == ["QuantizeLinear"]
    onnx.checker.check_model(to_proto(model), full_check=True)


# ---------------------------------------------------------------- tiny BERT
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    zoo = pytest.importorskip("onnxq.zoo")
    from onnxq.passes.canonicalize import canonicalize

    path = zoo.tiny_bert_onnx(tmp_path_factory.mktemp("bert"))
    base = canonicalize(ir.load(path))
    cal = [random_feeds(base, batch=4, seq=16, seed=i, vocab=500) for i in range(4)]
    test = [random_feeds(base, batch=2, seq=16, seed=100 + i, vocab=500) for i in range(2)]
    return base, cal, test


def _w8a8_error(fp, model, cal, test, target):
    q = model.clone()
    InsertQDQPass(stats=calibrate(q, cal), target=get_target(target))(q)
    num = den = 0.0
    outs = []
    for feed in test:
        ref, got = run(fp, feed)[0], run(q, feed)[0]
        outs.append(got)
        num += float(np.sum((ref - got) ** 2))
        den += float(np.sum(ref**2))
    return (num / den) ** 0.5, outs


def test_tiny_bert_split_layout(tiny_bert):
    base, cal, test = tiny_bert
    model = base.clone()
    gelus = [n.outputs[0].name for n in model.graph if n.op_type == "Gelu"]
    stats = calibrate(model, cal)
    res = PerEmbeddingGroupPass(stats=stats, producers=("Gelu",))(model)
    assert [s["tensor"] for s in res.sites] == gelus and len(gelus) == 2
    assert all(s["layout"] == "split" for s in res.sites)
    assert all(s["linears"] == [s["module"]] and s["module"].endswith("output.dense")
               for s in res.sites)
    counts = op_counts(model)
    assert counts["Split"] == 2 and counts["Gather"] == op_counts(base)["Gather"]
    assert _rel_err(base, model, test) <= 1e-5
    onnx.checker.check_model(to_proto(model), full_check=True)

    gather = base.clone()
    PerEmbeddingGroupPass(stats=stats, producers=("Gelu",), contiguous=False)(gather)
    for target in ("tensorrt", "ort-cpu"):
        err_fp, _ = _w8a8_error(base, base, cal, test, target)
        err_split, q_split = _w8a8_error(base, model, cal, test, target)
        err_gather, q_gather = _w8a8_error(base, gather, cal, test, target)
        assert err_split < 0.8 * err_fp, (target, err_split, err_fp)
        # same groups, same scales: the two layouts quantize identically
        assert abs(err_split - err_gather) <= 0.02 * err_gather
        for a, b in zip(q_split, q_gather, strict=True):
            assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_tiny_bert_all_sites(tiny_bert):
    """Without a producer filter the LayerNorm-output sites (Q/K/V and fc1, shared with
    the residual) keep the Gather layout and the FFN down-projections use Split."""
    base, cal, test = tiny_bert
    model = base.clone()
    res = PerEmbeddingGroupPass(stats=calibrate(model, cal))(model)
    layouts = {s["tensor"]: s["layout"] for s in res.sites}
    assert {t for t, lay in layouts.items() if lay == "split"} == {"gelu", "gelu_1"}
    assert all(s["layout_reason"] for s in res.sites if s["layout"] == "gather")
    assert _rel_err(base, model, test) <= 1e-5
    blob = _bytes(model)
    assert not PerEmbeddingGroupPass(stats=calibrate(model, cal))(model).modified
    assert _bytes(model) == blob
