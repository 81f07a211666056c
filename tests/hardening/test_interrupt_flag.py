"""A recorded interrupt stops the run at the next stage boundary and blocks the output
rename, even if the KeyboardInterrupt raised by the signal handler got lost."""

from __future__ import annotations

import pytest

from onnxq import _interrupt
from onnxq._progress import Progress
from onnxq.io import atomic_output


@pytest.fixture(autouse=True)
def _clean_flag():
    _interrupt.clear()
    yield
    _interrupt.clear()


def test_stage_boundaries_raise_once_requested():
    progress = Progress(verbosity=0)
    with progress.stage("first"):
        pass  # no request: runs normally
    with pytest.raises(KeyboardInterrupt), progress.stage("second"):
        _interrupt.request()  # e.g. swallowed inside this stage
    with pytest.raises(KeyboardInterrupt), progress.stage("third"):
        raise AssertionError("a requested interrupt must not start another stage")


def test_atomic_output_writes_nothing_after_a_request(tmp_path):
    dest = tmp_path / "out.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_output(dest) as tmp:
        (tmp / dest.name).write_bytes(b"model")
        _interrupt.request()
    assert list(tmp_path.iterdir()) == []
    _interrupt.clear()
    with atomic_output(dest) as tmp:
        (tmp / dest.name).write_bytes(b"model")
    assert dest.read_bytes() == b"model"
