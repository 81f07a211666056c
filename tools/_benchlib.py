"""Helpers shared by the benchmark scripts in tools/.

The scripts run as ``python tools/<script>.py``, so this folder is on ``sys.path`` and
they import this module as ``import _benchlib``.

* :func:`write_section` — replace the ``<!-- NAME:start -->`` … ``<!-- NAME:end -->``
  block of docs/benchmarks.md, or append it;
* :func:`prepare_minilm` — the canonicalized FP32 all-MiniLM-L6-v2 graph, cached in a
  work folder;
* :func:`versions`, :func:`provenance`, :func:`cpu_model`, :func:`cpu_isa` — what a
  results section says about the software and the machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
#: The distributions :func:`versions` reports by default.
PACKAGES = ("onnxq", "onnxruntime", "onnx", "onnx-ir", "torch", "transformers", "numpy")
_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


# --------------------------------------------------------------------------- docs


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section ``name``: ``<!-- name:start -->``, ``<!-- name:end -->``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str, *, heading: str | None = None) -> str:
    """``text`` with the block of section ``name`` set to ``body`` (markers added here).

    The block between the markers (inclusive) is replaced; without the markers the block
    is appended after a blank line, preceded by ``## heading`` when given.
    """
    start, end = markers(name)
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    if heading:
        block = f"## {heading}\n\n{block}"
    text = text.rstrip()
    return (text + "\n\n" if text else "") + block + "\n"


def write_section(name: str, body: str, *, heading: str | None = None,
                  path: str | os.PathLike[str] = DOCS) -> pathlib.Path:
    """Write section ``name`` of ``path`` (default docs/benchmarks.md) atomically.

    See :func:`replace_section`; a missing file starts as ``# onnxq benchmarks``.
    Returns the path written.
    """
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# onnxq benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(replace_section(text, name, body, heading=heading), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- model


def prepare_minilm(work: pathlib.Path) -> tuple[pathlib.Path, str]:
    """``work/fp32.onnx`` (all-MiniLM-L6-v2 exported and canonicalized) and its tokenizer folder.

    Saved as one file (onnxruntime's quantizer needs that); reused when ``work`` already
    holds it (``work/fp32.json`` records the tokenizer folder).
    """
    import onnxq

    fp32 = work / "fp32.onnx"
    meta = work / "fp32.json"
    if not fp32.exists() or not meta.exists():
        model, tok = onnxq.load_source(None)  # = onnxq.export(None), keeping the folder
        onnxq.prepare(model)
        onnxq.save(model, fp32)
        meta.write_text(json.dumps({"tokenizer": str(tok)}))
    return fp32, json.loads(meta.read_text())["tokenizer"]


# --------------------------------------------------------------------------- machine


def versions(packages: Sequence[str] = PACKAGES) -> str:
    """``"Python 3.x, onnxq 0.1.0, onnxruntime …"`` for the installed ones of ``packages``."""
    import importlib.metadata as md

    parts = [f"Python {platform.python_version()}"]
    for pkg in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{pkg} {md.version(pkg)}")
    return ", ".join(parts)


def _cpuinfo_field(key: str) -> str | None:
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def cpu_model() -> str | None:
    """The CPU's ``model name`` from /proc/cpuinfo, or None."""
    return _cpuinfo_field("model name")


def cpu_isa() -> list[str]:
    """Which of AVX2, AVX-512F, AVX-512 VNNI and AVX-VNNI the CPU flags list."""
    flags = (_cpuinfo_field("flags") or "").split()
    return [f for f in _ISA if f in flags]


def provenance(command: str, *, machine: str | None = None) -> str:
    """The ``- Date / - Machine / - Versions / - Command`` lines of a results section.

    ``machine`` defaults to ``"<processor>, <n> logical cores"``.
    """
    if machine is None:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([
        f"- Date: {now}",
        f"- Machine: {machine}",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
    ])
