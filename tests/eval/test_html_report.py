"""The HTML report: self-contained files, and a real render in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import onnxq
from onnxq.calibration.runner import calibrate
from onnxq.eval.analyze import analyze
from onnxq.eval.compare import compare
from onnxq.eval.html import write_html_report
from onnxq.recipe import Recipe
from onnxq.testing import encoder_block_model, random_feeds

pytest.importorskip("matplotlib")

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PNG = b"\x89PNG\r\n\x1a\n"


def _feeds(model, seed=0):
    return [random_feeds(model, batch=4, seq=8, seed=seed + i) for i in range(3)]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    m = encoder_block_model()
    res = analyze(m, [_feeds(m), _feeds(m, 10)], names=["set A", "set B"])
    q = m.clone()
    onnxq.quantize(q, calibrate(q, _feeds(m)), recipe=Recipe(int8_embeddings=False))
    errs = compare(m, q, _feeds(m, 20))
    after = res.stats[0]  # the same tensors; a stand-in for post-pass statistics
    report = {"source": "encoder block <test>", "target": "tensorrt",
              "fidelity": {"mean_cosine": 0.999, "min_cosine": 0.99, "samples": 12,
                           "recall_at_10": None, "top1_agreement": None},
              "coverage": {"fraction": 1.0}, "lint": [],
              "output": {"path": "q.onnx", "bytes": 12345},
              "timings_s": {"calibrate": 0.5, "quantize": 0.1}}
    path = tmp_path_factory.mktemp("html") / "report.html"
    write_html_report(report, path, analysis=res, layer_errors={"onnxq": errs, "again": errs},
                      stats_before=res.stats[0], stats_after=after, title="test report")
    return path


def test_files_are_self_contained(report_path):
    page = report_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert not re.search(r'src="(?!data:)', page), "every image must be a data URI"
    assert "&lt;test&gt;" in page  # escaped
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) >= 3
    for u in uris:
        assert base64.b64decode(u).startswith(_PNG)
    plots = sorted((report_path.parent / "report.plots").glob("*.png"))
    assert len(plots) == len(uris)
    assert {p.name for p in plots} >= {"layer_error_activations.png", "channel_ranges_1.png"}
    data = json.loads((report_path.parent / "report.data.json").read_text())
    assert data["analysis"]["sites"][0]["tensor"] == "ln1"
    assert set(data["layer_errors"]) == {"onnxq", "again"}
    for word in ("Summary", "Stage timings", "Outlier analysis", "Per-layer error",
                 "Per-channel ranges", "OS+", "calibrate"):
        assert word in page


def test_rewrite_replaces_old_plots(report_path, tmp_path):
    dest = tmp_path / "r.html"
    write_html_report({"title": "x"}, dest)
    (tmp_path / "r.plots" / "stale.png").write_bytes(b"x")
    m = encoder_block_model()
    write_html_report({"title": "x"}, dest, analysis=analyze(m, [_feeds(m)]))
    assert not (tmp_path / "r.plots" / "stale.png").exists()
    assert list((tmp_path / "r.plots").glob("channel_ranges_*.png"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.html")]


def _chromium(*args, tmp_path):
    cmd = [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_CHROMIUM is None,
                    reason="chromium is not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(report_path, tmp_path):
    url = report_path.resolve().as_uri()
    dom = _chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<table") >= 4
    for cls in ("summary", "timings", "outliers", "ranking", "layer-errors"):
        assert f'class="{cls}"' in html, cls
    imgs = re.findall(r"<img [^>]*>", html)
    assert len(imgs) >= 3
    assert all('src="data:image/png;base64,' in i for i in imgs)

    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", url, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(_PNG)
    # The screenshot is 1200x2000 and not blank: the page painted text and plots.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2000)
    from matplotlib import image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1200)
    assert float(np.std(pixels[..., :3])) > 0.05
    # the plots are coloured (bars, ranges): some clearly non-grey pixels exist
    rgb = pixels[..., :3]
    assert float((rgb.max(axis=-1) - rgb.min(axis=-1)).max()) > 0.3
