"""Tests of onnxq.calibration.stats: the statistics file and the graph fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.observers import TensorObserver
from onnxq.calibration.stats import STATS_FORMAT_VERSION, Stats, graph_fingerprint
from onnxq.errors import CalibrationDataError, StatsMismatchError


def _stats() -> Stats:
    rng = np.random.default_rng(7)
    a = TensorObserver(bins=64, sample_rows=4, seed=1)
    a.update(rng.normal(size=(2, 5, 3)).astype(np.float32))
    b = TensorObserver(bins=128)
    b.update(rng.uniform(-2, 9, size=(20,)))
    return Stats(
        fingerprint="ab" * 32,
        observers={"/layer.0/Add_output_0": a, "x/with:odd chars": b, "unused": TensorObserver()},
        meta={"samples": 3, "onnxq_version": "0.1.0", "nested": {"k": [1, 2]}},
    )


def _assert_same(x: Stats, y: Stats) -> None:
    assert x.fingerprint == y.fingerprint and x.meta == y.meta and x.names() == y.names()
    for name in x.names():
        ax, ay = x[name].to_arrays(), y[name].to_arrays()
        assert ax.keys() == ay.keys()
        for key in ax:
            np.testing.assert_array_equal(ax[key], ay[key], err_msg=f"{name}/{key}")
            assert ax[key].dtype == ay[key].dtype


def test_roundtrip(tmp_path: Path) -> None:
    stats = _stats()
    path = tmp_path / "calib.npz"
    stats.save(path)
    loaded = Stats.load(path)
    _assert_same(stats, loaded)
    assert "x/with:odd chars" in loaded and "nope" not in loaded and len(loaded) == 3
    assert loaded.range("x/with:odd chars") == stats.range("x/with:odd chars")
    assert loaded.range("/layer.0/Add_output_0", "percentile", percentile=99.0)[1] > 0
    with pytest.raises(KeyError, match="nope"):
        loaded["nope"]


def test_save_is_atomic_and_exact_path(tmp_path: Path) -> None:
    path = tmp_path / "stats.bin"  # no .npz suffix is added
    _stats().save(path)
    _stats().save(path)  # overwriting works
    assert sorted(os.listdir(tmp_path)) == ["stats.bin"]


def test_save_rejects_unserialisable_meta(tmp_path: Path) -> None:
    stats = _stats()
    stats.meta["bad"] = object()
    with pytest.raises(ValueError, match="JSON"):
        stats.save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == []


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(CalibrationDataError, match=match) as info:
        Stats.load(path)
    assert "\n" not in str(info.value)


def test_load_missing(tmp_path: Path) -> None:
    _expect_error(tmp_path / "none.npz", "does not exist")


def test_load_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"hello, this is not numpy\n" * 10)
    _expect_error(path, "not an onnxq statistics file")


def test_load_truncated(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    _stats().save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        path.write_bytes(data[:cut])
        _expect_error(path, "corrupted")


def test_load_bit_flip(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    stats = _stats()
    stats.save(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        arrays = {i.filename: zf.read(i.filename) for i in infos}
    target = next(name for name in arrays if name.endswith("hist.npy"))
    blob = bytearray(arrays[target])
    blob[-3] ^= 0xFF
    with zipfile.ZipFile(path, "w") as zf:  # valid zip, inconsistent content
        for name, content in arrays.items():
            zf.writestr(name, bytes(blob) if name == target else content)
    _expect_error(path, "corrupted")


def test_load_other_npz(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.ones(3))
    _expect_error(path, "not an onnxq statistics file")
    np.save(tmp_path / "plain.npy", np.ones(3))
    _expect_error(tmp_path / "plain.npy", "not an onnxq statistics file")
    np.savez(path, header=np.asarray(json.dumps({"format": "something-else"})))
    _expect_error(path, "not an onnxq statistics file")


def _rewrite(path: Path, mutate) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    mutate(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_header(arrays: dict, **changes) -> None:
    header = json.loads(str(arrays["header"]))
    header.update(changes)
    arrays["header"] = np.asarray(json.dumps(header))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: _edit_header(a, version=STATS_FORMAT_VERSION + 1), "incompatible version"),
        (lambda a: a.update(header=np.asarray("{not json")), "corrupted"),
        (lambda a: _edit_header(a, names="x"), "corrupted"),
        (lambda a: a.pop("t/0/hist"), "corrupted.*missing"),
        (lambda a: a.update({"t/0/hist": np.zeros(3, np.int64)}), "corrupted.*hist"),
        (lambda a: a.update({"t/9/hist": np.zeros(3, np.int64)}), "corrupted"),
        (lambda a: a.update({"stray": np.zeros(3)}), "corrupted"),
        (lambda a: a.update({"t/1/max": np.asarray(np.nan)}), "corrupted.*NaN"),
        (lambda a: a.update({"t/0/ch_sum": np.zeros(5)}), "corrupted.*ch_sum"),
    ],
)
def test_load_rejects_bad_content(tmp_path: Path, mutate, match: str) -> None:
    path = tmp_path / "s.npz"
    _stats().save(path)
    _rewrite(path, mutate)
    _expect_error(path, match)


def test_check_fingerprint() -> None:
    stats = _stats()
    stats.check_fingerprint("ab" * 32)
    with pytest.raises(StatsMismatchError, match="different graph.*recalibrate"):
        stats.check_fingerprint("cd" * 32)


# ----------------------------------------------------------------- fingerprint
def _model_proto(weight: np.ndarray, *, alpha: float = 0.5) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("LeakyRelu", ["h"], ["y"], name="act", alpha=alpha),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weight() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def test_fingerprint_stable_and_sensitive() -> None:
    base = graph_fingerprint(ir.from_proto(_model_proto(_weight())))
    assert len(base) == 64
    assert graph_fingerprint(ir.from_proto(_model_proto(_weight()))) == base
    changed = _weight()
    changed[2, 1] += 1e-3
    assert graph_fingerprint(ir.from_proto(_model_proto(changed))) != base
    assert graph_fingerprint(ir.from_proto(_model_proto(_weight(), alpha=0.25))) != base
    renamed = _model_proto(_weight())
    renamed.graph.node[1].output[0] = "z"
    renamed.graph.output[0].name = "z"
    assert graph_fingerprint(ir.from_proto(renamed)) != base


def test_fingerprint_with_ir_builder_and_tensor_attribute() -> None:
    def build(value: float) -> ir.Model:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
        const = ir.node(
            "Constant", [], attributes={"value": ir.tensor(np.array([value, 1.0], np.float32))}
        )
        const.outputs[0].name = "c"
        add = ir.node("Add", [x, const.outputs[0]])
        add.outputs[0].name = "y"
        graph = ir.Graph([x], [add.outputs[0]], nodes=[const, add], opset_imports={"": 18})
        return ir.Model(graph, ir_version=10)

    assert graph_fingerprint(build(2.0)) == graph_fingerprint(build(2.0))
    assert graph_fingerprint(build(2.0)) != graph_fingerprint(build(3.0))


def test_fingerprint_same_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model_proto(_weight()), path)
    code = (
        "import onnx_ir as ir, sys\n"
        "from onnxq.calibration.stats import graph_fingerprint\n"
        "print(graph_fingerprint(ir.load(sys.argv[1])))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == graph_fingerprint(ir.load(path))
