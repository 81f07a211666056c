"""Loading and saving models: clear errors on bad files, atomic writes, external data.

Every file onnxq writes goes through :func:`save`: the model (and its external
data, if any) is written into a temporary directory beside the destination and
then renamed into place, so an interrupted or failed run never leaves a
partial output behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import warnings

import onnx
import onnx_ir as ir

from onnxq import _interrupt
from onnxq.errors import ModelLoadError, OnnxqError

__all__ = ["EXTERNAL_DATA_THRESHOLD", "atomic_output", "load", "save", "total_initializer_bytes"]

# Above this many bytes of initializers the model is saved with external data
# (protobuf cannot serialise messages past 2 GiB; leave headroom for the graph).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx-ir, checking it and its external data.

    Raises:
        ModelLoadError: the file is missing, truncated, not ONNX, or its
            external data is missing or too short.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a folder, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"model file {p} is empty")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{p} is not a readable ONNX model (no graph)")
    bad = _non_utf8_string(proto)
    if bad is not None:
        raise ModelLoadError(f"{p} is not a readable ONNX model (a {bad} is not UTF-8 text)")
    _check_external_data(proto, p.parent)
    # onnx-ir logs a warning for each dangling reference and reads on; _check_graph
    # refuses such graphs with one line instead.
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. unknown external-data keys
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{p} holds an invalid ONNX graph: {exc}".splitlines()[0]) from None
    finally:
        serde_log.setLevel(level)
    ir.external_data.set_base_dir(model.graph, p.parent)
    _check_graph(model, p)
    return model


def _non_utf8_string(message) -> str | None:
    """Name of the first string field holding bytes that are not UTF-8 (protobuf hands
    those back as ``bytes``), or None. Tensor payloads are not visited."""
    stack = [message]
    while stack:
        msg = stack.pop()
        for field, value in msg.ListFields():
            repeated = _is_repeated(field)
            if field.type == field.TYPE_STRING:
                values = value if repeated else [value]
                if any(isinstance(v, bytes) for v in values):
                    return f"{field.containing_type.name}.{field.name}"
            elif field.type == field.TYPE_MESSAGE:
                if repeated:
                    stack.extend(value)
                else:
                    stack.append(value)
    return None


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6 dropped ``label``
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _check_graph(model: ir.Model, p: pathlib.Path) -> None:
    """Refuse what onnx-ir reads leniently: tensors whose data does not fit their shape,
    node inputs and graph outputs that nothing defines."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            _check_tensor(value.const_value, p)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
                _check_tensor(attr.value, p)
        for value in node.inputs:
            if value is not None and _undefined(value):
                raise ModelLoadError(
                    f"{p} holds an invalid ONNX graph: input {value.name!r} of node "
                    f"{node.name or node.op_type!r} is not defined"
                )
    for value in model.graph.outputs:
        if _undefined(value):
            raise ModelLoadError(
                f"{p} holds an invalid ONNX graph: output {value.name!r} is not defined"
            )


def _undefined(value: ir.Value) -> bool:
    return (value.producer() is None and not value.is_graph_input()
            and not value.is_initializer())


def _check_tensor(tensor, p: pathlib.Path) -> None:
    if tensor is None:
        return
    name = getattr(tensor, "name", None) or "<unnamed>"
    try:
        if isinstance(tensor, ir.ExternalTensor):
            if tensor.length is not None and tensor.length != tensor.nbytes:
                raise ValueError(f"{tensor.length} bytes of data for {tensor.nbytes}")
            end = (tensor.offset or 0) + tensor.nbytes
            if end > os.path.getsize(tensor.path):
                raise ValueError(f"its external data ends at {end}, beyond the file")
        else:
            tensor.numpy()  # inline data: a view of the protobuf bytes, no copy
    except Exception as exc:  # onnx-ir raises ValueError/TypeError on bad sizes or types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{p} holds an invalid ONNX graph: tensor {name!r} does not match its "
            f"shape and type ({reason})"
        ) from None


def _check_external_data(proto: onnx.ModelProto, base: pathlib.Path) -> None:
    sizes: dict[str, int] = {}
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        try:
            target = (base / location).resolve()
            inside = target.is_relative_to(base.resolve())
        except (ValueError, OSError):  # NUL bytes, loops, ...
            target, inside = None, False
        if location and target is not None and not inside:
            raise ModelLoadError(
                f"external data {location!r} of tensor {tensor.name!r} lies outside the "
                "model's folder"
            )
        if not location or target is None or not target.is_file():
            raise ModelLoadError(
                f"external data {location!r} of tensor {tensor.name!r} not found next to the model"
            )
        size = sizes.setdefault(location, target.stat().st_size)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info.get("length", 0) or 0)
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0:
            raise ModelLoadError(
                f"external data of tensor {tensor.name!r} has an invalid offset or length"
            )
        if offset + length > size:
            raise ModelLoadError(
                f"external data {location!r} is truncated (tensor {tensor.name!r} needs "
                f"{offset + length} bytes, file has {size})"
            )


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def total_initializer_bytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers (external ones included)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary directory; files in it are moved next to ``path`` on success.

    The caller writes ``tmpdir / path.name`` (and any sidecar files); on a clean
    exit every file in the directory is renamed into ``path``'s folder, the main
    file last. On an exception nothing is moved and the temporary directory is
    removed.
    """
    dest = pathlib.Path(path)
    parent = dest.parent if str(dest.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise OnnxqError(f"output folder {parent} does not exist")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    try:
        yield tmp
        _interrupt.check()  # an interrupted run writes nothing, even if the raise got lost
        produced = sorted(tmp.iterdir(), key=lambda f: f.name == dest.name)
        for f in produced:
            os.replace(f, parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Save ``model`` to ``path`` atomically.

    Args:
        model: the model to write.
        path: destination ``.onnx`` file.
        external_data: write initializers to ``<name>.data`` beside the file. ``None``
            chooses automatically: external data when the weights exceed
            :data:`EXTERNAL_DATA_THRESHOLD`.
    """
    dest = pathlib.Path(path)
    if external_data is None:
        external_data = total_initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with atomic_output(dest) as tmp:
        target = tmp / dest.name
        if external_data:
            ir.save(model, target, external_data=f"{dest.name}.data", size_threshold_bytes=1024)
        else:
            _save_inline(model, target)
    # A stale sidecar from an earlier external-data save would confuse users.
    stale = dest.parent / f"{dest.name}.data"
    if not external_data and stale.exists():
        stale.unlink()


def _save_inline(model: ir.Model, target: pathlib.Path) -> None:
    # Tensors still backed by another file's external data are read into memory
    # so the written file stands alone.
    ir.external_data.load_to_model(model)
    proto = ir.serde.serialize_model(model)
    with open(target, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
