"""PerEmbeddingGroupPass: PEG activation groups as per-group linears + Sum."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.runner import calibrate, default_tensors
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.peg import PEG_KEY, PerEmbeddingGroupPass, peg_groups
from onnxq.targets.profiles import get_target
from onnxq.testing import encoder_block_model, op_counts, run, to_proto

VARIANTS = {
    "post-ln": dict(post_ln=True),
    "pre-ln": dict(post_ln=False),
    "rms": dict(post_ln=False, rms=True, bias=False),
}
TAG = "PerEmbeddingGroupPass"


def _block(gelu_outlier: bool = False, **kw):
    """``encoder_block_model`` with inferred shapes; ``gelu_outlier`` plants a large GELU
    channel (fc1 column 5 scaled up) so that fc2's input has an outlier too."""
    model = encoder_block_model(**kw)
    if gelu_outlier:
        w = model.graph.initializers["fc1.weight"]
        arr = w.const_value.numpy().copy()
        arr[:, 5] *= 25.0
        w.const_value = ir.tensor(arr, name=w.name)
    common_passes.ShapeInferencePass()(model)
    return model


def _feeds(seed=0, n=6, batch=4, seq=16, hidden=16, name="x"):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal((batch, seq, hidden)).astype(np.float32)}
            for _ in range(n)]


def _rel_err(ref_model, model, feeds):
    worst = 0.0
    for feed in feeds:
        refs = run(ref_model, feed)
        gots = run(model, feed)
        for ref, got in zip(refs, gots):
            worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    return worst


def _bytes(model):
    return to_proto(model).SerializeToString()


def _new_nodes(before: collections.Counter, model) -> collections.Counter:
    after = op_counts(model)
    after.subtract(before)
    return collections.Counter({k: v for k, v in after.items() if v})


def _linear_model(k: int, n: int, *, bias: bool, consumers: int = 1, seed: int = 0,
                  output_is_matmul: bool = False) -> ir.Model:
    """``x [batch, seq, k]`` read by ``consumers`` linears (and a residual-like Mul)."""
    rng = np.random.default_rng(seed)
    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", k])
    inits, nodes, outs = [], [], []

    def const(name, arr):
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                     type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        return v

    def val(name, width):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                        shape=ir.Shape(["batch", "seq", width]))

    for c in range(consumers):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        mm = val(f"lin{c}_mm", n)
        nodes.append(ir.node("MatMul", [x, const(f"lin{c}.weight", w)], outputs=[mm],
                             name=f"node_lin{c}_mm",
                             metadata_props={"onnxq.module": f"lin{c}"}))
        out = mm
        if bias and not output_is_matmul:
            b = (0.1 * rng.standard_normal(n)).astype(np.float32)
            out = val(f"lin{c}_out", n)
            nodes.append(ir.node("Add", [mm, const(f"lin{c}.bias", b)], outputs=[out],
                                 name=f"node_lin{c}_out"))
        outs.append(out)
    # another reader of x that must keep the original tensor
    sq = val("x_sq", k)
    nodes.append(ir.node("Mul", [x, x], outputs=[sq], name="node_x_sq"))
    outs.append(sq)
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits,
                     opset_imports={"": 21}, name="linears")
    return ir.Model(graph, ir_version=10)


def _outlier_feeds(k, *, seed, n=2, channel=None, scale=40.0, shift=10.0):
    rng = np.random.default_rng(seed)
    channel = k // 2 if channel is None else channel
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((2, 8, k)).astype(np.float32)
        x[..., channel] = shift + scale * x[..., channel]
        feeds.append({"x": x})
    return feeds


# ------------------------------------------------------------------ grouping
@given(k=st.integers(1, 200), groups=st.integers(1, 12), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_peg_groups_partition(k, groups, seed):
    rng = np.random.default_rng(seed)
    lo = -rng.uniform(0, 2, k)
    hi = rng.uniform(0, 2, k)
    hi[rng.integers(k)] = 100.0  # one outlier
    parts = peg_groups(lo, hi, groups)
    g = min(groups, k)
    assert len(parts) == g
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(k))  # a partition
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    r = hi - lo
    assert int(np.argmax(r)) in parts[-1]  # the outlier is in the last group
    for a, b in zip(parts, parts[1:]):  # contiguous in range order
        assert r[a].max() <= r[b].min()


def test_peg_groups_ties_are_stable():
    parts = peg_groups(np.zeros(7), np.ones(7), 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]


# ----------------------------------------------------------------- structure
def test_structure_fc1():
    model = _block()
    stats = calibrate(model, _feeds(1))
    before = op_counts(model)
    res = PerEmbeddingGroupPass(stats=stats)(model)
    assert res.modified
    # fc1: 6 Gathers, 6 MatMuls replace 1, one Sum; nothing else changes
    assert _new_nodes(before, model) == {"Gather": 6, "MatMul": 5, "Sum": 1}
    nodes = {n.name: n for n in model.graph}
    assert "node_fc1_mm" not in nodes and "node_fc2_mm" in nodes
    assert "fc1.weight" not in model.graph.initializers
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert [g.outputs[0].name for g in gathers] == [f"ln1_peg{g}" for g in range(6)]
    for g in gathers:
        assert g.inputs[0].name == "ln1" and g.attributes.get_int("axis") == 2
        assert g.metadata_props["onnxq.pass"] == TAG
        assert g.metadata_props["onnxq.module"] == "fc1"
    (total,) = [n for n in model.graph if n.op_type == "Sum"]
    assert total.outputs[0].name == "fc1_mm" and len(total.inputs) == 6
    assert total.outputs[0].consumers()[0].name == "node_fc1_out"  # the bias Add
    for g, part in enumerate(total.inputs):
        mm = part.producer()
        assert mm.op_type == "MatMul" and mm.name == f"node_fc1_mm_peg{g}"
        assert mm.inputs[0] is gathers[g].outputs[0]
        assert mm.metadata_props["onnxq.module"] == "fc1"
        assert mm.metadata_props["onnxq.pass"] == TAG
        assert mm.metadata_props[PEG_KEY] == TAG
    # the residual keeps reading the LayerNorm output
    assert nodes["node_residual"].inputs[1].name == "ln1"
    (site,) = res.sites
    assert site["module"] == "fc1" and site["method"] == "peg" and site["tensor"] == "ln1"
    assert site["groups"] == 6 and site["group_sizes"] == [3, 3, 3, 3, 2, 2]
    assert 3 in site["widest_group"]  # the planted LN outlier channel
    assert site["group_ranges"][-1] == site["range_before"]
    assert site["range_before"] > 5 * site["group_ranges"][-2]
    assert site["outlier_ratio"] > 4 and site["nodes_added"] == 12
    # fc2 (GELU input of the plain block) has no outlier
    (skip,) = res.skipped
    assert skip["module"] == "fc2" and "outlier ratio" in skip["reason"]
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_producers_filter_and_gelu_outlier():
    model = _block(gelu_outlier=True)
    stats = calibrate(model, _feeds(1))
    res = PerEmbeddingGroupPass(stats=stats, producers=("Gelu",), groups=4)(model)
    assert [s["module"] for s in res.sites] == ["fc2"] and not res.skipped
    assert 5 in res.sites[0]["widest_group"]
    # fc2's input comes from fc1 -> Add -> Gelu: contiguous groups, one Split
    assert res.sites[0]["layout"] == "split"
    assert op_counts(model)["Split"] == 1 and op_counts(model)["Gather"] == 0
    assert model.graph.node("node_fc1_mm") is not None  # fc1 left alone


def test_shared_input_split_together():
    ref = _linear_model(12, 10, bias=True, consumers=3)
    model = _linear_model(12, 10, bias=True, consumers=3)
    cal = _outlier_feeds(12, seed=1, n=3)
    stats = calibrate(model, cal)
    before = op_counts(model)
    res = PerEmbeddingGroupPass(stats=stats, groups=5)(model)
    (site,) = res.sites
    assert site["linears"] == ["lin0", "lin1", "lin2"] and site["module"] == "lin0,lin1,lin2"
    # one set of Gathers, shared by the three linears
    assert _new_nodes(before, model) == {"Gather": 5, "MatMul": 3 * 4, "Sum": 3}
    assert site["nodes_added"] == 5 + 3 * 5
    assert model.graph.node("node_x_sq").inputs[0].name == "x"  # other reader untouched
    assert _rel_err(ref, model, _outlier_feeds(12, seed=9)) <= 1e-4
    # calibration and Q/DQ see one tensor per group: 5 shared activation Q/DQ pairs
    assert default_tensors(model) == [f"x_peg{g}" for g in range(5)]
    stats2 = calibrate(model, cal)
    qres = InsertQDQPass(stats=stats2, target=get_target("tensorrt"))(model)
    assert sorted(a.name for a in qres.activations) == [f"x_peg{g}" for g in range(5)]
    assert len(qres.weights) == 15
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_matmul_graph_output_keeps_name():
    ref = _linear_model(9, 7, bias=False)
    model = _linear_model(9, 7, bias=False)
    stats = calibrate(model, _outlier_feeds(9, seed=1))
    assert PerEmbeddingGroupPass(stats=stats, groups=4)(model).modified
    out = model.graph.outputs[0]
    assert out.name == "lin0_mm" and out.producer().op_type == "Sum"
    assert _rel_err(ref, model, _outlier_feeds(9, seed=2)) <= 1e-4


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("gelu_outlier", [False, True])
def test_fp32_equivalent(variant, gelu_outlier):
    ref = _block(gelu_outlier=gelu_outlier, **VARIANTS[variant])
    model = _block(gelu_outlier=gelu_outlier, **VARIANTS[variant])
    res = PerEmbeddingGroupPass(stats=calibrate(model, _feeds(1)))(model)
    assert [s["module"] for s in res.sites] == (["fc1", "fc2"] if gelu_outlier else ["fc1"])
    assert _rel_err(ref, model, _feeds(seed=7, n=2)) <= 1e-4
    onnx.checker.check_model(to_proto(model), full_check=True)


@given(
    k=st.integers(2, 40),
    n=st.integers(1, 24),
    groups=st.integers(2, 9),
    bias=st.booleans(),
    consumers=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
@settings(max_examples=20, deadline=None)
def test_fp32_equivalent_hypothesis(k, n, groups, bias, consumers, seed):
    ref = _linear_model(k, n, bias=bias, consumers=consumers, seed=seed)
    model = _linear_model(k, n, bias=bias, consumers=consumers, seed=seed)
    channel = seed % k
    stats = calibrate(model, _outlier_feeds(k, seed=seed, channel=channel))
    # min_outlier_ratio=0: with K=2 the max/median ratio cannot reach 4
    res = PerEmbeddingGroupPass(stats=stats, groups=groups, min_outlier_ratio=0.0)(model)
    (site,) = res.sites
    g = min(groups, k)
    assert site["groups"] == g and sum(site["group_sizes"]) == k
    assert channel in site["widest_group"]
    counts = op_counts(model)
    assert counts["Gather"] == g and counts["MatMul"] == g * consumers
    assert counts["Sum"] == consumers
    assert _rel_err(ref, model, _outlier_feeds(k, seed=seed + 1, channel=channel)) <= 1e-4


# ------------------------------------------------------------------ contract
def test_no_outlier_graph_untouched():
    model = _block(outlier_channel=None)
    stats = calibrate(model, _feeds(1))
    blob = _bytes(model)
    res = PerEmbeddingGroupPass(stats=stats)(model)
    assert not res.modified and not res.sites
    assert len(res.skipped) == 2
    assert all("outlier ratio" in s["reason"] for s in res.skipped)
    assert _bytes(model) == blob


def test_no_statistics_and_channel_mismatch_untouched():
    model = _block()
    blob = _bytes(model)
    stats = calibrate(model, _feeds(1), tensors=["fc2_out"])
    res = PerEmbeddingGroupPass(stats=stats)(model)
    assert not res.modified and {s["reason"] for s in res.skipped} == {"no statistics"}
    # statistics of another tensor under the right name (wrong channel count)
    other = calibrate(model, _feeds(1), tensors=["gelu"])
    stats.observers["ln1"] = other["gelu"]
    res = PerEmbeddingGroupPass(stats=stats)(model)
    assert not res.modified and "channel" in res.skipped[0]["reason"]
    assert _bytes(model) == blob


def test_groups_must_be_at_least_two():
    with pytest.raises(ValueError):
        PerEmbeddingGroupPass(stats=None, groups=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_idempotent(variant):
    ref = _block(gelu_outlier=True, **VARIANTS[variant])
    model = _block(gelu_outlier=True, **VARIANTS[variant])
    stats = calibrate(model, _feeds(1))
    assert PerEmbeddingGroupPass(stats=stats)(model).modified
    blob = _bytes(model)
    # same statistics, and fresh statistics of the rewritten graph
    for s in (stats, calibrate(model, _feeds(1))):
        again = PerEmbeddingGroupPass(stats=s, min_outlier_ratio=0.0)(model)
        assert not again.modified and _bytes(model) == blob
        assert again.skipped and all(x["reason"] == "already split" for x in again.skipped)
    assert _rel_err(ref, model, _feeds(seed=3, n=1)) <= 1e-4


def test_deterministic_names():
    a, b = _block(gelu_outlier=True), _block(gelu_outlier=True)
    for m in (a, b):
        PerEmbeddingGroupPass(stats=calibrate(m, _feeds(1)))(m)
    assert _bytes(a) == _bytes(b)


# -------------------------------------------------------------------- effect
def _w8a8_error(fp_model, model, cal, test, target="tensorrt"):
    q = model.clone()
    stats = calibrate(q, cal)
    qres = InsertQDQPass(stats=stats, target=get_target(target))(q)
    num = den = 0.0
    for feed in test:
        (ref,) = run(fp_model, feed)
        (got,) = run(q, feed)
        num += float(np.sum((ref - got) ** 2))
        den += float(np.sum(ref**2))
    return (num / den) ** 0.5, qres


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_peg_reduces_w8a8_error(variant, target):
    fp = _block(gelu_outlier=True, **VARIANTS[variant])
    model = _block(gelu_outlier=True, **VARIANTS[variant])
    cal, test = _feeds(1), _feeds(50, n=2)
    PerEmbeddingGroupPass(stats=calibrate(model, cal))(model)
    err_fp, base = _w8a8_error(fp, fp, cal, test, target)
    err_peg, qres = _w8a8_error(fp, model, cal, test, target)
    assert err_peg < 0.6 * err_fp
    # every group tensor got its own per-tensor Q/DQ, the original inputs none
    names = [a.name for a in qres.activations]
    assert names == [f"ln1_peg{g}" for g in range(6)] + [f"gelu_peg{g}" for g in range(6)]
    assert len(qres.weights) == 12 and len(base.activations) == 2
    scales = {a.name: a.scale for a in qres.activations}
    # the widest group carries the outlier: its scale dwarfs the first group's
    assert scales["ln1_peg5"] > 5 * scales["ln1_peg0"]
    assert scales["gelu_peg5"] > 5 * scales["gelu_peg0"]
