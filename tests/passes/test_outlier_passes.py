"""Channel-migration passes: OS+, SmoothQuant, explicit FFN scaling, and their fold machinery."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnx_ir.passes.common as common_passes

from onnxq.calibration.runner import calibrate
from onnxq.passes._patterns import find_linears, find_norm_sites
from onnxq.passes.channel_fold import (
    FOLDED_KEY,
    fold_into_linear,
    fold_into_norm,
    insert_explicit_transform,
    restore_for_consumers,
)
from onnxq.passes.ffn_scaling import ExplicitChannelScalingPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.outlier_suppression_plus import (
    OutlierSuppressionPlusPass,
    search_shift_scale,
)
from onnxq.passes.smooth_quant import SmoothQuantPass
from onnxq.targets.profiles import get_target
from onnxq.testing import encoder_block_model, op_counts, random_feeds, run, to_proto

VARIANTS = {
    "post-ln": dict(post_ln=True),
    "pre-ln": dict(post_ln=False),
    "rms": dict(post_ln=False, rms=True, bias=False),
}
TENSORS = ["ln1", "gelu"]


def _block(**kw):
    """``encoder_block_model`` with inferred shapes (the calibration runner observes a
    tensor per channel only when its last dimension is known)."""
    model = encoder_block_model(**kw)
    common_passes.ShapeInferencePass()(model)
    return model


def _feeds(seed=0, n=6, batch=4, seq=16, hidden=16):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, seq, hidden)).astype(np.float32)}
            for _ in range(n)]


def _stats(model, tensors=TENSORS, sample_rows=512):
    return calibrate(model, _feeds(1), tensors=tensors, sample_rows=sample_rows)


def _rel_err(ref_model, model, feeds):
    worst = 0.0
    for feed in feeds:
        (ref,) = run(ref_model, feed)
        (got,) = run(model, feed)
        worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    return worst


def _bytes(model):
    return to_proto(model).SerializeToString()


def _new_nodes(before: collections.Counter, model) -> collections.Counter:
    after = op_counts(model)
    after.subtract(before)
    return +after


def _make_pass(kind, stats, **kw):
    if kind == "os+":
        return OutlierSuppressionPlusPass(stats=stats, **kw)
    if kind == "smoothquant":
        return SmoothQuantPass(stats=stats, **kw)
    # thresholds off so the explicit pass fires on every variant
    kw = {"min_outlier_ratio": 0.0, "min_gain": 0.0, **kw}
    return ExplicitChannelScalingPass(stats=stats, **kw)


PASSES = ["os+", "smoothquant", "explicit"]


# ---------------------------------------------------------------- structure
def test_os_plus_post_ln_structure():
    model = _block(post_ln=True)
    before = op_counts(model)
    fc2_bias = model.graph.initializers["fc2.bias"].const_value.numpy().copy()
    res = OutlierSuppressionPlusPass(stats=_stats(model))(model)
    assert res.modified
    # the shift z went into fc2's bias: the restore is a single Mul
    assert _new_nodes(before, model) == {"Mul": 1}
    nodes = {n.name: n for n in model.graph}
    # nothing in front of fc1: it still reads the LayerNorm output
    fc1 = nodes["node_fc1_mm"]
    assert fc1.inputs[0].producer().op_type == "LayerNormalization"
    # the residual Add reads LN * s, and fc2's bias carries + z
    residual = nodes["node_residual"]
    mul = residual.inputs[1].producer()
    assert mul.op_type == "Mul" and mul.inputs[0].producer().op_type == "LayerNormalization"
    assert mul.metadata_props["onnxq.pass"] == "OutlierSuppressionPlusPass"
    (site,) = res.sites
    new_bias = model.graph.initializers["fc2.bias"].const_value.numpy()
    assert np.abs(new_bias - fc2_bias).max() > 1e-3  # z != 0 on the planted channels
    assert nodes["node_ln1"].metadata_props[FOLDED_KEY] == "OutlierSuppressionPlusPass"
    assert fc1.metadata_props[FOLDED_KEY] == "OutlierSuppressionPlusPass"
    assert site["module"] == "ln1" and site["method"] == "os+"
    assert site["linears"] == ["fc1"] and site["restored"] == ["node_residual"]
    assert site["max_channel_after"] < site["max_channel_before"] / 4
    assert site["loss_after"] <= min(site["loss_before"], site["loss_shift_only"])
    assert np.isfinite(site["t"]) and site["scaled_channels"] >= 1
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_os_plus_post_ln_without_bias_restores_with_mul_add():
    """No linear bias beside the residual Add to carry z: Mul + Add, still exact."""
    model = _block(post_ln=True, bias=False)
    ref = _block(post_ln=True, bias=False)
    before = op_counts(model)
    res = OutlierSuppressionPlusPass(stats=_stats(model))(model)
    assert res.modified
    # Mul + Add restore, and fc1 gains a bias Add for z·W
    assert _new_nodes(before, model) == {"Mul": 1, "Add": 2}
    residual = {n.name: n for n in model.graph}["node_residual"]
    add = residual.inputs[1].producer()
    assert add.op_type == "Add" and add.inputs[0].producer().op_type == "Mul"
    assert _rel_err(ref, model, _feeds(3)) < 1e-5


@pytest.mark.parametrize("variant", ["pre-ln", "rms"])
def test_os_plus_pre_ln_adds_no_nodes(variant):
    model = _block(**VARIANTS[variant])
    before = op_counts(model)
    res = OutlierSuppressionPlusPass(stats=_stats(model))(model)
    assert res.modified
    assert op_counts(model) == before
    (site,) = res.sites
    if variant == "rms":
        assert site["max_abs_z"] == 0.0 and site["loss_shift_only"] is None


def test_smooth_quant_structure():
    post = _block(post_ln=True)
    before = op_counts(post)
    res = SmoothQuantPass(stats=_stats(post), alpha=0.5)(post)
    assert res.modified and _new_nodes(before, post) == {"Mul": 1}  # no shift: no Add
    (site,) = res.sites
    assert site["alpha"] == 0.5 and site["max_channel_after"] < site["max_channel_before"]
    pre = _block(post_ln=False)
    before = op_counts(pre)
    assert SmoothQuantPass(stats=_stats(pre))(pre).modified
    assert op_counts(pre) == before


def test_explicit_scaling_structure():
    model = _block(post_ln=True)
    before = op_counts(model)
    res = _make_pass("explicit", _stats(model))(model)
    assert res.modified
    assert _new_nodes(before, model) == {"Mul": 1, "Add": 1}
    nodes = {n.name: n for n in model.graph}
    fc2 = nodes["node_fc2_mm"]
    add = fc2.inputs[0].producer()
    mul = add.inputs[0].producer()
    assert (add.op_type, mul.op_type) == ("Add", "Mul")
    assert mul.inputs[0].producer().op_type == "Gelu"
    assert fc2.metadata_props[FOLDED_KEY] == "ExplicitChannelScalingPass"
    # fc1 and the LayerNorm are untouched
    assert nodes["node_fc1_mm"].inputs[0].producer().op_type == "LayerNormalization"
    assert FOLDED_KEY not in nodes["node_ln1"].metadata_props


def test_explicit_scaling_default_thresholds():
    # the post-LN block's GELU output has no real outlier channel (max/median < 4): untouched
    model = _block(post_ln=True)
    stats = _stats(model)
    blob = _bytes(model)
    res = ExplicitChannelScalingPass(stats=stats)(model)
    assert not res.modified and _bytes(model) == blob
    assert "outlier ratio" in res.skipped[0]["reason"]
    # the RMS block's is larger (about 3.6); with a lower bar the search gains a lot
    rms = _block(**VARIANTS["rms"])
    stats = _stats(rms)
    blob = _bytes(rms)
    res = ExplicitChannelScalingPass(stats=stats, min_outlier_ratio=2.0, min_gain=0.999)(rms)
    assert not res.modified and _bytes(rms) == blob
    assert "loss gain" in res.skipped[0]["reason"]
    res = ExplicitChannelScalingPass(stats=stats, min_outlier_ratio=2.0)(rms)
    assert res.modified
    (site,) = res.sites
    assert site["outlier_ratio"] > 2 and site["gain"] > 0.5
    assert site["loss_after"] < site["loss_before"]


# ----------------------------------------------------------------- numerics
@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_equivalent(kind, variant):
    ref = _block(**VARIANTS[variant])
    model = _block(**VARIANTS[variant])
    res = _make_pass(kind, _stats(model))(model)
    assert res.modified
    assert _rel_err(ref, model, _feeds(seed=7, n=2)) <= 1e-4
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_os_plus_then_explicit_scaling_same_stats():
    # OS+ changes only the LN output, so the GELU statistics stay valid for the second pass
    ref = _block(**VARIANTS["rms"])
    model = _block(**VARIANTS["rms"])
    stats = _stats(model)
    assert OutlierSuppressionPlusPass(stats=stats)(model).modified
    assert ExplicitChannelScalingPass(stats=stats, min_outlier_ratio=2.0)(model).modified
    assert _rel_err(ref, model, _feeds(seed=7, n=2)) <= 1e-4


# ----------------------------------------------------------------- contract
@pytest.mark.parametrize("kind", PASSES)
def test_no_sites_leaves_graph_untouched(kind):
    model = _block()
    stats = calibrate(model, _feeds(1), tensors=["fc2_out"], sample_rows=64)
    blob = _bytes(model)
    res = _make_pass(kind, stats)(model)
    assert not res.modified and not res.sites
    assert res.skipped and all(s["reason"] == "no statistics" for s in res.skipped)
    assert _bytes(model) == blob


@pytest.mark.parametrize("kind", ["os+", "explicit"])
def test_needs_reservoir_sample(kind):
    model = _block()
    stats = calibrate(model, _feeds(1), tensors=TENSORS)  # no sample_rows
    blob = _bytes(model)
    res = _make_pass(kind, stats)(model)
    assert not res.modified and _bytes(model) == blob
    assert "sample" in res.skipped[0]["reason"]


@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("variant", ["post-ln", "rms"])
def test_idempotent(kind, variant):
    ref = _block(**VARIANTS[variant])
    model = _block(**VARIANTS[variant])
    stats = _stats(model)
    assert _make_pass(kind, stats)(model).modified
    blob = _bytes(model)
    again = _make_pass(kind, stats)(model)
    assert not again.modified
    assert all(s["reason"] == "already folded" for s in again.skipped)
    assert _bytes(model) == blob
    assert _rel_err(ref, model, _feeds(seed=3, n=1)) <= 1e-4


def test_deterministic_names():
    a = _block(post_ln=True)
    b = _block(post_ln=True)
    for m in (a, b):
        stats = _stats(m)
        OutlierSuppressionPlusPass(stats=stats)(m)
        _make_pass("explicit", stats)(m)
    assert _bytes(a) == _bytes(b)


# -------------------------------------------------------------- fold pieces
def test_fold_into_linear_without_bias_adds_bias_and_keeps_name():
    ref = _block(**VARIANTS["rms"])
    model = _block(**VARIANTS["rms"])
    (fc1, _) = find_linears(model.graph)
    rng = np.random.default_rng(0)
    z, s = rng.standard_normal(16), rng.uniform(0.5, 2.0, 16)
    out_name = fc1.output.name
    # fc1 has no bias and z != 0: the fold must add one behind the MatMul
    assert insert_explicit_transform(fc1.input, [fc1], z, s) is None
    assert fc1.bias_add is not None and fc1.output.name == out_name
    assert fc1.output.consumers()[0].op_type == "Gelu"
    assert _rel_err(ref, model, _feeds(seed=2, n=1)) <= 1e-4


def test_fold_refusals():
    model = _block(post_ln=True)
    graph = model.graph
    (site,) = find_norm_sites(graph)
    (fc1,) = site.linears
    z, s = np.zeros(16), np.full(16, 2.0)
    # a weight shared with another node is refused
    other = ir.node("Identity", [fc1.weight], outputs=[ir.Value(name="w_copy")])
    graph.append(other)
    blob_w = fc1.weight.const_value.numpy().copy()
    assert "shared" in fold_into_linear(fc1, z, s)
    np.testing.assert_array_equal(fc1.weight.const_value.numpy(), blob_w)
    graph.remove(other, safe=True)
    # wrong sizes
    assert "shape" in fold_into_linear(fc1, np.zeros(3), np.ones(3))
    assert fold_into_norm(site.norm, None, np.ones(3)) is not None
    # RMSNorm cannot take a shift
    rms = _block(**VARIANTS["rms"])
    (rsite,) = find_norm_sites(rms.graph)
    assert "shift" in fold_into_norm(rsite.norm, np.ones(16), np.ones(16))
    # a value that is a graph output cannot be restored
    y = graph.outputs[0]
    assert "graph output" in restore_for_consumers(y, [site.others[0]], z, s)


def test_fold_into_norm_shared_gamma_creates_new_initializers():
    model = _block(post_ln=True)
    graph = model.graph
    (site,) = find_norm_sites(graph)
    norm = site.norm
    gamma = norm.inputs[1]
    other = ir.node("Identity", [gamma], outputs=[ir.Value(name="gamma_copy")])
    graph.append(other)
    old = gamma.const_value.numpy().copy()
    s = np.full(16, 4.0)
    assert fold_into_norm(norm, np.ones(16), s) is None
    assert norm.inputs[1] is not gamma  # new initializer
    np.testing.assert_array_equal(gamma.const_value.numpy(), old)  # shared one intact
    np.testing.assert_allclose(norm.inputs[1].const_value.numpy(), old / 4.0, rtol=1e-6)
    # β was not shared: updated in place, name kept
    assert norm.inputs[2].name == "ln1.bias"


def test_search_never_worse_than_shift_only_or_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] = 20 + 8 * x[:, 5]
    w = rng.standard_normal((32, 24)).astype(np.float32)
    choice = search_shift_scale(x, [w], num_candidates=40)
    assert choice.loss <= choice.loss_identity and choice.loss <= choice.loss_shift_only
    assert choice.s[5] > 1 and choice.gain > 0.5
    flat = search_shift_scale(x[:, :5], [w[:5]], shift=False, scale=False)
    assert flat.is_identity and flat.candidates == 1


# ------------------------------------------------------------------- effect
def _w8a8_error(fp_model, model, cal, test):
    q = model.clone()
    stats = calibrate(q, cal)
    InsertQDQPass(stats=stats, target=get_target("tensorrt"))(q)
    num = den = 0.0
    for feed in test:
        (ref,) = run(fp_model, feed)
        (got,) = run(q, feed)
        num += float(np.sum((ref - got) ** 2))
        den += float(np.sum(ref**2))
    return (num / den) ** 0.5


def _range_ratio(model, name):
    obs = calibrate(model, _feeds(1), tensors=[name])[name]
    rng = obs.ch_max - obs.ch_min
    return float(rng.max() / np.median(rng))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_os_plus_reduces_outliers_and_w8a8_error(variant):
    fp = _block(**VARIANTS[variant])
    model = _block(**VARIANTS[variant])
    OutlierSuppressionPlusPass(stats=_stats(model))(model)
    before, after = _range_ratio(fp, "ln1"), _range_ratio(model, "ln1")
    assert before > 10 and after < 3
    cal, test = _feeds(1), _feeds(50, n=2)
    err_fp = _w8a8_error(fp, fp, cal, test)
    err_os = _w8a8_error(fp, model, cal, test)
    assert err_os < 0.8 * err_fp


# --------------------------------------------------------------- tiny BERT
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    zoo = pytest.importorskip("onnxq.zoo")
    if not hasattr(zoo, "tiny_bert_onnx"):
        pytest.skip("onnxq.zoo.tiny_bert_onnx is not available")
    from onnxq.passes.canonicalize import canonicalize

    path = zoo.tiny_bert_onnx(tmp_path_factory.mktemp("bert"))
    base = canonicalize(ir.load(path))
    cal = [random_feeds(base, batch=4, seq=16, seed=i, vocab=500) for i in range(6)]
    test = [random_feeds(base, batch=2, seq=16, seed=100 + i, vocab=500) for i in range(2)]
    graph = base.graph
    tensors = [s.output.name for s in find_norm_sites(graph)]
    tensors += [u.input.name for u in find_linears(graph) if u.input.producer().op_type == "Gelu"]
    stats = calibrate(base, cal, tensors=tensors, sample_rows=512)
    return base, stats, cal, test


def test_tiny_bert_os_plus_and_explicit_scaling(tiny_bert):
    base, stats, cal, test = tiny_bert
    model = base.clone()
    before = op_counts(model)
    os_res = OutlierSuppressionPlusPass(stats=stats)(model)
    ffn_res = ExplicitChannelScalingPass(stats=stats)(model)
    assert os_res.modified and ffn_res.modified
    # every LN feeding linears is a post-LN residual source
    assert len(os_res.sites) == 4
    assert all(len(s["restored"]) == 1 for s in os_res.sites)
    assert len(ffn_res.sites) == 2  # both FFN down-projections carry the planted outlier
    # OS+: one Mul per site (z rides on the o_proj / FFN-output biases); FFN: Mul + Add
    assert _new_nodes(before, model) == {"Mul": 4 + 2, "Add": 2}
    assert _rel_err(base, model, test) <= 1e-4
    onnx.checker.check_model(to_proto(model), full_check=True)
    err_fp = _w8a8_error(base, base, cal, test)
    err_new = _w8a8_error(base, model, cal, test)
    assert err_new < 0.5 * err_fp


def test_tiny_bert_smooth_quant(tiny_bert):
    base, stats, _, test = tiny_bert
    model = base.clone()
    res = SmoothQuantPass(stats=stats, alpha=0.5)(model)
    assert res.modified and len(res.sites) == 4
    assert _rel_err(base, model, test) <= 1e-4
