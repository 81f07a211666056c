"""Run a model in onnxruntime over calibration data and feed the observers.

The runner is the only part of calibration that touches onnxruntime. It taps
the tensors it needs as extra graph outputs on a shallow clone of the model,
runs it batch by batch with graph optimisations off (so tapped values are the
ones the graph computes, not fused variants), and streams every batch into one
:class:`~onnxq.calibration.observers.TensorObserver` per tensor. Raw
activations are dropped after each batch, so memory does not depend on the
number of samples.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxq.calibration.observers import TensorObserver
from onnxq.calibration.stats import Stats, graph_fingerprint
from onnxq.errors import CalibrationDataError, OnnxqError
from onnxq.passes._patterns import find_attention_matmuls, find_linears, module_of

__all__ = ["calibrate", "default_tensors", "make_session"]

_INLINE_LIMIT = 1_500_000_000


def default_tensors(model: ir.Model) -> list[str]:
    """Names of the activations onnxq may quantize: inputs of linear and attention MatMuls."""
    names: list[str] = []
    seen = set()

    def add(v: ir.Value | None) -> None:
        if v is not None and v.name and v.name not in seen and v.const_value is None:
            seen.add(v.name)
            names.append(v.name)

    for unit in find_linears(model.graph):
        add(unit.input)
    for att in find_attention_matmuls(model.graph):
        add(att.node.inputs[0])
        add(att.node.inputs[1])
    return names


def _has_external(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


@contextlib.contextmanager
def make_session(
    model: ir.Model,
    *,
    optimize: bool = False,
    threads: int | None = None,
    extra_options: Mapping[str, str] | None = None,
):
    """An onnxruntime CPU session for an in-memory onnx-ir model.

    Small models are passed as bytes; models with external data or above
    1.5 GB are written to a temporary folder first.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (extra_options or {}).items():
        opts.add_session_config_entry(k, v)
    from onnxq.io import total_initializer_bytes

    if _has_external(model) or total_initializer_bytes(model) > _INLINE_LIMIT:
        with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
            path = pathlib.Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            yield ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    else:
        proto = ir.serde.serialize_model(model)
        yield ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )


def _row_mask(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None or arr.ndim < 3 or arr.shape[:2] != mask.shape:
        return None
    return mask.astype(bool).reshape(-1)


def calibrate(
    model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    tensors: Sequence[str] | None = None,
    sample_rows: Mapping[str, int] | int = 0,
    bins: int = 2048,
    progress: Callable[[int], None] | None = None,
    meta: Mapping[str, object] | None = None,
) -> Stats:
    """Collect activation statistics of ``model`` over ``data``.

    Args:
        model: the graph to calibrate (not modified).
        data: iterable of feed dicts (input name -> array).
        tensors: value names to observe; default :func:`default_tensors`.
        sample_rows: rows to keep in a bounded reservoir per tensor (for passes
            that simulate a layer), an int for all tensors or a per-name mapping.
        bins: histogram bins per tensor.
        progress: called with the number of samples of every finished batch.
        meta: extra JSON-serialisable facts stored in the Stats.

    Returns:
        Stats with one observer per tensor and the graph's fingerprint.
    """
    names = list(tensors) if tensors is not None else default_tensors(model)
    if not names:
        raise OnnxqError("the model has no MatMul activations to calibrate")
    values = _values_by_name(model)
    missing = [n for n in names if n not in values]
    if missing:
        raise OnnxqError(f"tensor {missing[0]!r} is not in the model")
    clone = model.clone()
    cvalues = _values_by_name(clone)
    existing = {o.name for o in clone.graph.outputs}
    for n in names:
        if n in existing:
            continue
        v = cvalues[n]
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
        clone.graph.outputs.append(v)

    def rows_for(n: str) -> int:
        return sample_rows.get(n, 0) if isinstance(sample_rows, Mapping) else int(sample_rows)

    observers = {n: TensorObserver(bins=bins, sample_rows=rows_for(n), seed=i)
                 for i, n in enumerate(names)}
    modules = {n: _consumer_module(values[n]) for n in names}
    # Per-channel statistics only where the last axis is a fixed feature axis; a
    # dynamic last axis (K transposed for Q.K^T, attention probabilities) is
    # observed per tensor.
    per_channel = {n: _static_last_dim(values[n]) for n in names}
    input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    samples = 0
    def checked(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing_inputs = [n for n in input_names if n not in feed]
        if missing_inputs:
            raise CalibrationDataError(
                f"calibration data has no input {missing_inputs[0]!r} "
                f"(model inputs: {', '.join(input_names)})"
            )
        return {k: v for k, v in feed.items() if k in input_names}

    def run(sess, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return sess.run(names, feed)
        except Exception as exc:  # onnxruntime raises on dtype/shape mismatches
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CalibrationDataError(f"calibration batch does not fit the model: {msg}") from None

    # onnxruntime releases the GIL while it runs, so the next batch runs on a worker
    # thread while this one feeds the observers: at most two batches of tapped
    # activations are alive at once, whatever the number of samples.
    obs_workers = max(1, min(2, os.cpu_count() or 1))
    with (make_session(clone) as sess,
          ThreadPoolExecutor(max_workers=1, initializer=_main_thread_signals) as pool,
          ThreadPoolExecutor(max_workers=obs_workers, initializer=_main_thread_signals)
          as obs_pool):
        batches = iter(data)
        first = next(batches, None)
        pending = None if first is None else (checked(first), None)
        if pending is not None:
            pending = (pending[0], pool.submit(run, sess, pending[0]))
        while pending is not None:
            feed, future = pending
            outs = future.result()
            nxt = next(batches, None)
            pending = None
            if nxt is not None:
                nfeed = checked(nxt)
                pending = (nfeed, pool.submit(run, sess, nfeed))
            mask = feed.get("attention_mask")

            def observe(n: str, arr: np.ndarray, mask=mask) -> str | None:
                row_mask = _row_mask(arr, mask) if per_channel[n] else None
                if not per_channel[n]:
                    arr = arr.reshape(-1, 1)
                try:
                    observers[n].update(arr, row_mask)
                except ValueError as exc:
                    return str(exc)
                return None

            # Observers are independent and numpy releases the GIL, so they update in
            # parallel (each one still sees the batches in order: same statistics).
            errors = list(obs_pool.map(observe, names, outs))
            for n, err in zip(names, errors, strict=True):
                if err is not None:
                    where = f" ({modules[n]})" if modules[n] else ""
                    raise CalibrationDataError(
                        f"calibration activation {n!r}{where}: {err}".splitlines()[0]
                    )
            del outs
            batch = next(iter(feed.values())).shape[0] if feed else 0
            samples += batch
            if progress is not None:
                progress(batch)
    if samples == 0:
        raise CalibrationDataError("calibration data holds no samples")
    info = {"samples": samples, "bins": bins}
    info.update(meta or {})
    return Stats(fingerprint=graph_fingerprint(model), observers=observers, meta=info)


def _main_thread_signals() -> None:
    """Worker-thread initializer: leave SIGINT/SIGTERM to the main thread.

    A signal taken by a worker thread does not interrupt the main thread's wait on a
    future; Python then runs the handler at whatever bytecode the main thread reaches
    next, which can be inside a finalizer where the KeyboardInterrupt is dropped and the
    run goes on. Blocked here, the kernel delivers the signal to the main thread, whose
    wait ends with the KeyboardInterrupt right away.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {}
    for v in model.graph.inputs:
        out[v.name] = v
    for node in model.graph:
        for o in node.outputs:
            if o.name:
                out[o.name] = o
    return out


def _static_last_dim(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) >= 2 and isinstance(shape[-1], int)


def _consumer_module(value: ir.Value) -> str:
    for use in value.uses():
        m = module_of(use.node)
        if m:
            return m
    return ""


