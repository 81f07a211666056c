"""`onnxq bench` / onnxq.eval.bench: interleaved timings, ratios against the first model,
one-line errors. Never asserts on speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import onnx_ir as ir
import pytest

from onnxq.errors import OnnxqError
from onnxq.eval.bench import bench, format_table, synth_feeds
from onnxq.testing import encoder_block_model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    a, b = d / "a.onnx", d / "b.onnx"
    ir.save(encoder_block_model(), a)
    ir.save(encoder_block_model(hidden=32, ffn=64, seed=1), b)
    return a, b


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxq", "bench", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def test_first_ratio_is_one_and_all_finite(two_models):
    res = bench([str(p) for p in two_models], batch=2, seq_len=8, threads=1, warmup=1,
                repeat=3)
    assert [r.path for r in res] == [str(p) for p in two_models]
    assert res[0].speedup == 1.0
    for r in res:
        assert r.runs == 3 and len(r.latencies_ms) == 3
        for v in (r.median_ms, r.p90_ms, r.mean_ms, r.min_ms, r.throughput, r.speedup):
            assert math.isfinite(v) and v > 0
        assert r.min_ms <= r.median_ms <= r.p90_ms
    assert res[1].speedup == pytest.approx(res[0].median_ms / res[1].median_ms)
    table = format_table(res)
    assert "1.00x" in table and "a.onnx" in table


def test_seconds_budget_gives_equal_runs(two_models):
    res = bench([str(p) for p in two_models], batch=1, seq_len=4, warmup=0, repeat=1,
                seconds=0.01)
    assert res[0].runs == res[1].runs >= 2


def test_synth_feeds_follow_the_graph(two_models):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(two_models[0]), providers=["CPUExecutionProvider"])
    feeds = synth_feeds(sess, batch=3, seq_len=5)
    assert feeds["x"].shape == (3, 5, 16) and feeds["x"].dtype.name == "float32"
    again = synth_feeds(sess, batch=3, seq_len=5)
    assert (feeds["x"] == again["x"]).all()  # fixed seed


def test_bad_path_raises_onnxq_error(two_models, tmp_path):
    with pytest.raises(OnnxqError, match="does not exist"):
        bench([str(two_models[0]), str(tmp_path / "missing.onnx")], repeat=1)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    with pytest.raises(OnnxqError) as info:
        bench([str(junk)], repeat=1)
    assert "\n" not in str(info.value)


def test_cli_json_parses(two_models):
    proc = _cli(*map(str, two_models), "--batch", "2", "--seq-len", "8", "--warmup", "1",
                "--repeat", "2", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data) == 2
    assert data[0]["speedup"] == 1.0
    assert {"median_ms", "p90_ms", "throughput", "speedup", "path"} <= set(data[1])


def test_cli_table(two_models):
    proc = _cli(*map(str, two_models), "--batch", "2", "--seq-len", "8", "--repeat", "2")
    assert proc.returncode == 0, proc.stderr
    assert "vs first" in proc.stdout and "1.00x" in proc.stdout


def test_cli_bad_path_one_line_exit_2(two_models, tmp_path):
    proc = _cli(str(two_models[0]), str(tmp_path / "missing.onnx"))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnxq: error:") and "missing.onnx" in lines[0]
    assert "Traceback" not in proc.stderr


def test_shared_pool_stays_in_the_child(two_models):
    """The timing child sets a process-wide onnxruntime thread pool; the caller's own
    sessions (per-session pools, e.g. calibration) must still work afterwards."""
    import onnxruntime as ort

    bench([str(two_models[0])], batch=1, seq_len=4, warmup=0, repeat=1, threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(two_models[0]), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, synth_feeds(sess, batch=1, seq_len=4))
    assert out[0].shape[0] == 1


def test_child_runs_sessions_on_one_shared_pool(two_models):
    """Structure of the child: its sessions do not own per-session thread pools."""
    code = (
        "import json, sys; from onnxq.eval.bench import _time_models;"
        "import onnxruntime as ort;"
        "t = _time_models(json.loads(sys.argv[1]));"
        "o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
        "try:\n"
        "    ort.InferenceSession(sys.argv[2], o, providers=['CPUExecutionProvider'])\n"
        "    print('per-session allowed')\n"
        "except Exception:\n"
        "    print('global pool active', len(t))\n"
    )
    spec = {"paths": [str(two_models[0])], "batch": 1, "seq_len": 4, "threads": 1, "warmup": 0,
            "repeat": 2, "seconds": None, "seed": 0, "session_options": {}}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(two_models[0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("global pool active 1"), proc.stdout
