"""Latency and throughput of ONNX graphs on onnxruntime CPU, measured side by side.

Timings on shared or small machines drift (frequency scaling, noisy neighbours,
thermal state), so comparing two graphs measured minutes apart says little.
:func:`bench` therefore runs all graphs **interleaved** in one process:
every repetition runs each model once (round-robin, with the starting model
rotated each round), so drift hits all of them alike, and reports each
model's speed as a ratio against the FIRST model::

    from onnxq.eval.bench import bench, format_table
    results = bench(["fp32.onnx", "int8.onnx"], batch=32, seq_len=128)
    print(format_table(results))

Inputs are synthesized from each graph's declared inputs with a fixed seed:
integer ids uniform in ``[0, 1000)``, ``attention_mask`` ones,
``token_type_ids`` zeros, float inputs standard normal. The first dynamic
dimension is the batch, every other dynamic dimension is ``seq_len``.
Sessions use ``ORT_ENABLE_ALL`` (so Q/DQ fusions happen, as in deployment).

The timing runs in a fresh child process whose sessions share **one** intra-op
thread pool (``set_global_thread_pool_sizes``). With one pool per session, the
idle workers of the model that just ran keep spinning while the next model runs
and steal its cores: on 2 cores that doubled the batch-1 latency of every graph
and distorted the ratios (FP32 MiniLM 64 ms interleaved vs 28 ms alone). One
shared pool is what a single deployed session sees, and the child keeps that
process-wide setting away from the caller's own onnxruntime sessions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxq.errors import ModelLoadError, OnnxqError

__all__ = ["BenchResult", "bench", "format_table", "synth_feeds"]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass
class BenchResult:
    """Timings of one graph (all times in milliseconds, per batch)."""

    path: str
    batch: int
    seq_len: int
    threads: int
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    """Samples per second at the median latency (``batch / median``)."""
    speedup: float
    """``first_median / this_median``: above 1 means faster than the first model."""
    latencies_ms: list[float] = dataclasses.field(default_factory=list, repr=False)

    def as_dict(self, *, with_latencies: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_latencies:
            d.pop("latencies_ms")
        return d


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[:1]) if text else type(exc).__name__


def _check_path(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a folder, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"model file {p} is empty")
    return p


def _session(path: pathlib.Path, session_options=None):
    """A session on the process-wide thread pool (set up by :func:`_time_models`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for key, value in (session_options or {}).items():
        opts.add_session_config_entry(key, str(value))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.use_per_session_threads = False
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises Fail/InvalidProtobuf/... with long texts
        raise ModelLoadError(f"onnxruntime cannot load {path}: {_one_line(exc)}") from None


def _time_models(spec: dict[str, Any]) -> list[list[float]]:
    """The timing loop; runs in the child process (see the module docstring)."""
    from onnxruntime.capi import _pybind_state

    # One intra-op pool for all sessions of this process (0 = all physical cores).
    _pybind_state.set_global_thread_pool_sizes(int(spec["threads"]), 1)
    checked = [pathlib.Path(p) for p in spec["paths"]]
    batch, seq_len = spec["batch"], spec["seq_len"]
    sessions = [_session(p, spec["session_options"]) for p in checked]
    feeds = []
    outputs = []
    for p, s in zip(checked, sessions, strict=True):
        f = synth_feeds(s, batch=batch, seq_len=seq_len, seed=spec["seed"])
        try:
            s.run(None, f)
        except Exception as exc:
            raise OnnxqError(f"onnxruntime cannot run {p} on batch {batch} x {seq_len}: "
                             f"{_one_line(exc)}") from None
        feeds.append(f)
        outputs.append([o.name for o in s.get_outputs()])

    n = len(sessions)
    for _ in range(spec["warmup"]):
        for s, f, o in zip(sessions, feeds, outputs, strict=True):
            s.run(o, f)
    times: list[list[float]] = [[] for _ in range(n)]
    rounds = 0
    spent = 0.0
    seconds, repeat = spec["seconds"], spec["repeat"]
    while True:
        if seconds is None:
            if rounds >= repeat:
                break
        elif rounds >= 2 and spent >= seconds:
            break
        start = rounds % n  # rotate who goes first, still one run per model per round
        for k in range(n):
            i = (start + k) % n
            t0 = time.perf_counter()
            sessions[i].run(outputs[i], feeds[i])
            dt = time.perf_counter() - t0
            times[i].append(dt * 1000.0)
            spent += dt
        rounds += 1
    return times


def _run_child(spec: dict[str, Any]) -> list[list[float]]:
    """Run :func:`_time_models` in a fresh interpreter; errors come back as one line."""
    root = str(pathlib.Path(__file__).resolve().parents[2])  # the folder holding onnxq/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    proc = subprocess.run([sys.executable, "-m", "onnxq.eval._bench_child"],
                          input=json.dumps(spec), capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        err_lines = proc.stderr.strip().splitlines()
        err = err_lines[-1] if err_lines else f"exit code {proc.returncode}"
        raise OnnxqError(f"the benchmark process failed: {err}")
    if "error" in reply:
        cls = ModelLoadError if reply.get("kind") == "ModelLoadError" else OnnxqError
        raise cls(reply["error"])
    return reply["times"]


def synth_feeds(session, *, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every input of an onnxruntime ``session`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise OnnxqError(f"cannot synthesize input {inp.name!r} of type {inp.type}")
        dims = []
        for i, d in enumerate(inp.shape or []):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            else:
                dims.append(batch if i == 0 else seq_len)
        name = inp.name.lower()
        if name == "attention_mask" or name.endswith("attention_mask"):
            arr = np.ones(dims, dtype=dtype)
        elif "token_type" in name:
            arr = np.zeros(dims, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 1000, size=dims).astype(dtype)
        elif dtype is np.bool_:
            arr = np.ones(dims, dtype=dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        feeds[inp.name] = arr
    return feeds


def bench(
    paths: Sequence[str | os.PathLike],
    *,
    batch: int = 32,
    seq_len: int = 128,
    threads: int = 0,
    warmup: int = 3,
    repeat: int = 10,
    seconds: float | None = None,
    seed: int = 0,
    session_options: dict[str, str] | None = None,
) -> list[BenchResult]:
    """Time ``paths`` interleaved on onnxruntime CPU; ratios are against ``paths[0]``.

    Args:
        paths: ONNX files; the first is the baseline.
        batch: samples per run.
        seq_len: tokens per sample (every dynamic dimension after the first).
        threads: intra-op threads; 0 = onnxruntime's default (all physical cores).
        warmup: untimed rounds before measuring.
        repeat: timed rounds (each round runs every model once).
        seconds: if given, keep running rounds until this much time has been spent
            measuring (at least 2 rounds); ``repeat`` is then ignored.
        seed: seed of the synthesized float inputs.
        session_options: onnxruntime session config entries for every session.

    The models are timed in a child process on one shared thread pool (see the
    module docstring).

    Raises:
        OnnxqError: a path is missing or not loadable, or an option is out of range.
    """
    if not paths:
        raise OnnxqError("bench needs at least one model")
    if batch <= 0 or seq_len <= 0:
        raise OnnxqError("batch and sequence length must be positive")
    if threads < 0 or warmup < 0:
        raise OnnxqError("threads and warmup must not be negative")
    if seconds is None and repeat <= 0:
        raise OnnxqError("repeat must be positive")
    if seconds is not None and seconds <= 0:
        raise OnnxqError("seconds must be positive")
    checked = [_check_path(p) for p in paths]
    spec = {"paths": [str(p) for p in checked], "batch": batch, "seq_len": seq_len,
            "threads": threads, "warmup": warmup, "repeat": repeat, "seconds": seconds,
            "seed": seed, "session_options": dict(session_options or {})}
    times = _run_child(spec)

    results = []
    base_median = float(np.median(times[0]))
    for p, ts in zip(paths, times, strict=True):
        arr = np.asarray(ts)
        med = float(np.median(arr))
        results.append(BenchResult(
            path=str(p), batch=batch, seq_len=seq_len, threads=threads, runs=len(ts),
            median_ms=med, p90_ms=float(np.percentile(arr, 90)), mean_ms=float(arr.mean()),
            min_ms=float(arr.min()), throughput=batch / (med / 1000.0),
            speedup=base_median / med, latencies_ms=[float(x) for x in ts],
        ))
    return results


def format_table(results: Sequence[BenchResult], *, names: Sequence[str] | None = None) -> str:
    """A plain-text table of ``results`` (one line per model)."""
    labels = list(names) if names is not None else [r.path for r in results]
    w = max([len("model")] + [len(x) for x in labels])
    head = (f"{'model':<{w}}  {'median ms':>10}  {'p90 ms':>9}  {'samples/s':>10}  "
            f"{'vs first':>8}")
    lines = [head, "-" * len(head)]
    for label, r in zip(labels, results, strict=True):
        lines.append(f"{label:<{w}}  {r.median_ms:>10.2f}  {r.p90_ms:>9.2f}  "
                     f"{r.throughput:>10.1f}  {r.speedup:>7.2f}x")
    if results:
        r0 = results[0]
        threads = r0.threads or "default"
        lines.append(f"batch {r0.batch} x {r0.seq_len}, {r0.runs} interleaved runs per model, "
                     f"intra-op threads {threads}, onnxruntime CPU, ORT_ENABLE_ALL")
    return "\n".join(lines)
