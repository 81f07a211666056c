"""Calibration statistics: a serialisable mapping of tensor name to observer.

A :class:`Stats` object carries the :class:`~onnxq.calibration.observers.TensorObserver`
of every tapped tensor together with the fingerprint of the graph it was
computed on, so that ``quantize`` can refuse statistics from another graph.

File format (``STATS_FORMAT_VERSION = 1``)
    A single ``.npz`` archive written with :func:`numpy.savez` (no pickle):

    * ``header``: a 0-d unicode array holding JSON
      ``{"format": "onnxq-stats", "version": 1, "fingerprint": ..., "names": [...], "meta": {...}}``;
    * ``t/<i>/<field>``: field ``<field>`` of
      :meth:`TensorObserver.to_arrays` for the tensor ``names[i]`` (indices
      keep arbitrary tensor names out of archive member names).

    The file is written to a temporary file in the destination directory and
    moved into place with :func:`os.replace`, so readers never see a partial
    file.

Graph fingerprint
    :func:`graph_fingerprint` is a SHA-256 over a length-prefixed,
    deterministic serialisation of everything that changes what a tensor
    holds: opset imports; graph inputs and outputs (name, dtype, shape);
    initializers sorted by name (name, dtype, shape, raw bytes); and each
    node in order (domain, op type, overload, input and output names, and
    attributes; tensor attributes by their bytes, subgraphs recursively); and
    local functions.  Length prefixes make the encoding injective, so two
    different graphs cannot produce the same byte stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.calibration.observers import TensorObserver, compute_range
from onnxq.errors import CalibrationDataError, StatsMismatchError

__all__ = ["STATS_FORMAT_VERSION", "Stats", "graph_fingerprint"]

STATS_FORMAT_VERSION = 1
_FORMAT_NAME = "onnxq-stats"
_HEADER_KEY = "header"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclasses.dataclass
class Stats:
    """Observers of the tapped tensors of one graph.

    Attributes:
        fingerprint: :func:`graph_fingerprint` of the graph the statistics
            were computed on.
        observers: Tensor (value) name to observer.
        meta: JSON-serialisable extra information, e.g.
            ``{"samples": 256, "onnxq_version": "0.1.0"}``.
    """

    fingerprint: str
    observers: dict[str, TensorObserver] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> TensorObserver:
        try:
            return self.observers[name]
        except KeyError:
            raise KeyError(f"no statistics for tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.observers

    def __len__(self) -> int:
        return len(self.observers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.observers)

    def names(self) -> list[str]:
        """Names of the observed tensors, in insertion order."""
        return list(self.observers)

    def range(self, name: str, method: str = "minmax", **kw: Any) -> tuple[float, float]:
        """Quantization range of one tensor.

        Args:
            name: Tensor name.
            method: A range method from ``OBSERVER_METHODS``.
            **kw: Passed to the estimator.

        Returns:
            ``(lo, hi)`` with ``lo <= 0 <= hi``.
        """
        return compute_range(self[name], method, **kw)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Make sure the statistics belong to a graph.

        Args:
            fingerprint: :func:`graph_fingerprint` of the graph about to be quantized.

        Raises:
            StatsMismatchError: If the fingerprints differ.
        """
        if fingerprint != self.fingerprint:
            raise StatsMismatchError(
                "statistics were computed on a different graph "
                f"(fingerprint {self.fingerprint[:12]} != {fingerprint[:12]}); recalibrate"
            )

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to one ``.npz`` file, atomically.

        The file is written exactly at ``path`` (no suffix is added).

        Args:
            path: Destination file.

        Raises:
            ValueError: If ``meta`` is not JSON-serialisable.
        """
        path = os.fspath(path)
        names = list(self.observers)
        try:
            header = json.dumps(
                {
                    "format": _FORMAT_NAME,
                    "version": STATS_FORMAT_VERSION,
                    "fingerprint": self.fingerprint,
                    "names": names,
                    "meta": self.meta,
                },
                sort_keys=True,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Stats.meta is not JSON-serialisable: {exc}") from exc
        arrays: dict[str, np.ndarray] = {_HEADER_KEY: np.asarray(header)}
        for index, name in enumerate(names):
            for field, value in self.observers[name].to_arrays().items():
                arrays[f"t/{index}/{field}"] = value

        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".onnxq-stats-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Stats:
        """Read statistics written by :meth:`save`.

        Args:
            path: File to read.

        Returns:
            The statistics.

        Raises:
            CalibrationDataError: With a one-line message if the file is
                missing, not an onnxq statistics file, corrupted, or written
                by an incompatible version.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CalibrationDataError(f"statistics file {path} does not exist")
        not_ours = CalibrationDataError(f"statistics file {path} is not an onnxq statistics file")

        def corrupted(reason: str) -> CalibrationDataError:
            return CalibrationDataError(f"statistics file {path} is corrupted: {_one_line(reason)}")

        try:
            archive = np.load(path, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise corrupted(f"{type(exc).__name__}: {exc}") from None
        except (ValueError, OSError):
            raise not_ours from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise not_ours
        with archive:
            try:
                files = set(archive.files)
                if _HEADER_KEY not in files:
                    raise not_ours
                header_arr = archive[_HEADER_KEY]
                if header_arr.shape != () or header_arr.dtype.kind != "U":
                    raise not_ours
                try:
                    header = json.loads(str(header_arr))
                except ValueError as exc:
                    raise corrupted(f"bad header: {exc}") from None
                if not isinstance(header, dict) or header.get("format") != _FORMAT_NAME:
                    raise not_ours
                if header.get("version") != STATS_FORMAT_VERSION:
                    raise CalibrationDataError(
                        f"statistics file {path} was written by an incompatible version "
                        f"(format {header.get('version')!r}, expected {STATS_FORMAT_VERSION})"
                    )
                fingerprint, names, meta = (
                    header.get("fingerprint"),
                    header.get("names"),
                    header.get("meta"),
                )
                if (
                    not isinstance(fingerprint, str)
                    or not isinstance(names, list)
                    or not all(isinstance(n, str) for n in names)
                    or len(set(names)) != len(names)
                    or not isinstance(meta, dict)
                ):
                    raise corrupted("bad header fields")
                fields: list[dict[str, np.ndarray]] = [{} for _ in names]
                for key in files - {_HEADER_KEY}:
                    parts = key.split("/")
                    if len(parts) != 3 or parts[0] != "t" or not parts[1].isdigit():
                        raise corrupted(f"unexpected entry {key!r}")
                    index = int(parts[1])
                    if index >= len(names):
                        raise corrupted(f"entry {key!r} has no tensor name")
                    fields[index][parts[2]] = archive[key]
                observers: dict[str, TensorObserver] = {}
                for name, arrays in zip(names, fields):
                    try:
                        observers[name] = TensorObserver.from_arrays(arrays)
                    except ValueError as exc:
                        raise corrupted(f"tensor {name!r}: {exc}") from None
            except CalibrationDataError:
                raise
            except Exception as exc:  # truncated members, CRC errors, bad npy headers, ...
                raise corrupted(f"{type(exc).__name__}: {exc}") from None
        return cls(fingerprint=fingerprint, observers=observers, meta=meta)


# --------------------------------------------------------------- fingerprint
class _Hasher:
    """Length-prefixed feed into SHA-256 (an injective encoding)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def text(self, value: object) -> None:
        data = str(value).encode("utf-8")
        self._h.update(f"s{len(data)}:".encode())
        self._h.update(data)

    def data(self, buffer: memoryview) -> None:
        self._h.update(f"b{buffer.nbytes}:".encode())
        self._h.update(buffer)  # hashlib streams the buffer; no copy of the tensor

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _shape_text(shape: ir.Shape | None) -> str:
    if shape is None:
        return "?"
    dims = []
    for dim in shape.dims:
        dims.append(str(dim) if isinstance(dim, int) else f"sym:{getattr(dim, 'value', dim)}")
    return "[" + ",".join(dims) + "]"


def _hash_value_info(h: _Hasher, value: ir.Value | None) -> None:
    if value is None:
        h.text("<none>")
        return
    h.text(value.name or "")
    h.text(value.dtype.name if value.dtype is not None else "?")
    h.text(_shape_text(value.shape))


def _hash_tensor(h: _Hasher, tensor: Any) -> None:
    if tensor is None:
        h.text("<no value>")
        return
    h.text(tensor.dtype.name)
    h.text(_shape_text(tensor.shape))
    if tensor.dtype == ir.DataType.STRING:
        strings = tensor.numpy().reshape(-1)
        h.text(len(strings))
        for item in strings:
            h.data(memoryview(item if isinstance(item, bytes) else str(item).encode("utf-8")))
        return
    array = np.ascontiguousarray(tensor.numpy())
    h.data(memoryview(array.reshape(-1).view(np.uint8)))


def _hash_attribute(h: _Hasher, attr: Any) -> None:
    h.text(attr.name)
    if attr.is_ref():
        h.text(f"@ref:{attr.ref_attr_name}")
        return
    kind = attr.type
    h.text(kind.name)
    if kind == ir.AttributeType.TENSOR:
        _hash_tensor(h, attr.value)
    elif kind == ir.AttributeType.TENSORS:
        h.text(len(attr.value))
        for tensor in attr.value:
            _hash_tensor(h, tensor)
    elif kind == ir.AttributeType.GRAPH:
        _hash_graph(h, attr.value)
    elif kind == ir.AttributeType.GRAPHS:
        h.text(len(attr.value))
        for graph in attr.value:
            _hash_graph(h, graph)
    else:
        h.text(repr(attr.value))


def _hash_nodes(h: _Hasher, nodes: Any) -> None:
    for node in nodes:
        h.text("node")
        h.text(node.domain)
        h.text(node.op_type)
        h.text(node.overload)
        h.text(len(node.inputs))
        for value in node.inputs:
            h.text("<none>" if value is None else (value.name or ""))
        h.text(len(node.outputs))
        for value in node.outputs:
            h.text(value.name or "")
        attributes = sorted(node.attributes.items(), key=lambda kv: kv[0])
        h.text(len(attributes))
        for _, attr in attributes:
            _hash_attribute(h, attr)
    h.text("end-nodes")


def _hash_graph(h: _Hasher, graph: ir.Graph) -> None:
    h.text("graph")
    for label, values in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        h.text(label)
        h.text(len(values))
        for value in values:
            _hash_value_info(h, value)
    initializers = sorted(graph.initializers.items(), key=lambda kv: kv[0])
    h.text(len(initializers))
    for name, value in initializers:
        h.text(name)
        _hash_tensor(h, value.const_value)
    _hash_nodes(h, graph)


def graph_fingerprint(model: ir.Model) -> str:
    """SHA-256 fingerprint of a model's graph structure and weights.

    Deterministic across runs and processes; any change to a node, an
    attribute, a graph input/output signature or an initializer value changes it.

    Args:
        model: The model.

    Returns:
        A 64-character hex digest.
    """
    h = _Hasher()
    h.text(f"onnxq-graph-fingerprint/{STATS_FORMAT_VERSION}")
    opsets = sorted(model.opset_imports.items())
    h.text(len(opsets))
    for domain, version in opsets:
        h.text(domain)
        h.text(version)
    _hash_graph(h, model.graph)
    functions = sorted(model.functions.items(), key=lambda item: tuple(item[0]))
    h.text(len(functions))
    for identifier, function in functions:
        h.text("/".join(identifier))
        h.text(len(function.inputs))
        for value in function.inputs:
            h.text(value.name or "")
        h.text(len(function.outputs))
        for value in function.outputs:
            h.text(value.name or "")
        attributes = sorted(function.attributes.items(), key=lambda kv: kv[0])
        h.text(len(attributes))
        for _, attr in attributes:
            _hash_attribute(h, attr)
        _hash_nodes(h, function)
    return h.hexdigest()
