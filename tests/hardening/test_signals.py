"""Interrupted runs (SIGINT, SIGTERM) exit with 130, say so in one line, leave nothing.

``onnxq convert -v`` runs on the tiny BERT with a large text calibration set; once it
reports that the given stage has started, the signal is sent. The process must exit
with code 130 (documented in ``onnxq.cli``), print exactly one non-blank line after the
stage line (``onnxq: interrupted; no output written``; no traceback, no "done"; click
adds a blank line to close a terminal's ``^C``), and leave no
output, report or temporary file (``.out.onnx.*``) in the output folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxq.calibration.default_text import calibration_texts
    from onnxq.zoo import tiny_bert_onnx

    root = tmp_path_factory.mktemp("sig")
    model = tiny_bert_onnx(root / "bert")
    texts = calibration_texts(200)
    calib = root / "calib.txt"
    calib.write_text("\n".join(texts * 40) + "\n", encoding="utf-8")  # 8000 samples
    return model, calib


def _interrupt(model, calib, out, sig, stage):
    cmd = [sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(out), "--calib",
           str(calib), "--samples", "8000", "--target", "tensorrt", "-v"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(f"onnxq: {stage} ..."):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(300), f"stage {stage!r} never started: {lines}"
        time.sleep(0.5)  # let it get going inside the stage
        assert proc.poll() is None, f"finished before the signal: {lines}"
        sent = len(lines)
        proc.send_signal(sig)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    stdout = proc.stdout.read()
    # click prints a blank line on an interrupt (closing the terminal's ^C echo)
    return code, [line for line in lines[sent:] if line.strip()], lines, stdout


@pytest.mark.parametrize("sig,stage", [(signal.SIGINT, "calibrate"),
                                       (signal.SIGTERM, "calibrate"),
                                       (signal.SIGTERM, "outlier passes")])
def test_interrupted_convert_leaves_nothing(bert, tmp_path, sig, stage):
    model, calib = bert
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "out.onnx"
    code, after, everything, stdout = _interrupt(model, calib, out, sig, stage)
    assert code == 130, everything
    assert after == ["onnxq: interrupted; no output written"], everything
    assert not any("Traceback" in line for line in everything)
    assert stdout == ""
    assert list(outdir.iterdir()) == [], list(outdir.iterdir())


def test_sigterm_before_work_is_clean(bert, tmp_path):
    """A signal during start-up (imports) still leaves no output and no traceback."""
    model, calib = bert
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(out),
                             "--calib", str(calib)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o.onnx")]
