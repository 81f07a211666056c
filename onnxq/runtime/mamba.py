"""Run a Mamba decode-step graph (:func:`onnxq.exporters.mamba.export_mamba_step`) in onnxruntime.

:class:`MambaSession` keeps the conv and SSM states between calls: ``reset(batch)``
zeroes them, ``step`` feeds one token per sequence, ``prefill`` steps through a prompt,
``generate`` decodes greedily and ``teacher_forced_logits`` returns the logits of every
position of a given sequence.  Works for the FP32 graph and for any QDQ graph derived
from it (the interface names are the same).

The state shapes are read from the graph inputs (``conv_state.{i}`` ``[B, D, K-1]``,
``ssm_state.{i}`` ``[B, D, N]``), so a graph loaded from a file needs no metadata.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import OnnxqError

__all__ = ["MambaSession"]

_STATE_INPUT = re.compile(r"^(conv_state|ssm_state)\.(\d+)$")


class MambaSession:
    """Stateful greedy decoding over a Mamba decode-step ONNX graph.

    Args:
        path_or_model: an ``.onnx`` path, an ``onnx_ir.Model`` or an ``onnx.ModelProto``.
        optimize: let onnxruntime optimise the graph (``ORT_ENABLE_ALL``); off by default
            so that QDQ graphs run exactly as written.
        threads: intra-op threads (onnxruntime's default when None).

    Attributes:
        batch: number of sequences of the current state.
        states: current state arrays by graph input name.
    """

    def __init__(
        self,
        path_or_model: str | os.PathLike[str] | ir.Model | object,
        *,
        optimize: bool = False,
        threads: int | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if isinstance(path_or_model, (str, os.PathLike)):
            self._sess = ort.InferenceSession(str(pathlib.Path(path_or_model)), opts, providers=providers)
        else:
            from onnxq.testing import to_proto

            proto = to_proto(path_or_model)  # type: ignore[arg-type]
            self._sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
        self._state_specs: dict[str, tuple[int, ...]] = {}
        names = [i.name for i in self._sess.get_inputs()]
        if not names or names[0] != "input_ids":
            raise OnnxqError("not a Mamba step graph: the first input must be 'input_ids'")
        for inp in self._sess.get_inputs()[1:]:
            if not _STATE_INPUT.match(inp.name):
                raise OnnxqError(f"not a Mamba step graph: unexpected input {inp.name!r}")
            dims = inp.shape[1:]
            if not all(isinstance(d, int) for d in dims):
                raise OnnxqError(f"state input {inp.name!r} has non-static dims {inp.shape}")
            self._state_specs[inp.name] = tuple(dims)
        self._outputs = [o.name for o in self._sess.get_outputs()]
        if self._outputs[0] != "logits":
            raise OnnxqError("not a Mamba step graph: the first output must be 'logits'")
        self._state_out = {
            name: name.replace("_state.", "_state_out.") for name in self._state_specs
        }
        missing = [o for o in self._state_out.values() if o not in self._outputs]
        if missing:
            raise OnnxqError(f"not a Mamba step graph: missing output {missing[0]!r}")
        self.batch = 0
        self.states: dict[str, np.ndarray] = {}
        self.reset(1)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def reset(self, batch: int = 1) -> None:
        """Zero the states for ``batch`` sequences."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        self.states = {
            name: np.zeros((batch, *dims), np.float32) for name, dims in self._state_specs.items()
        }

    def feeds(self, token_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """The feed dict of the next step (token ids plus the current states)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != self.batch:
            raise ValueError(f"got {ids.shape[0]} token ids for a batch of {self.batch}; call reset()")
        return {"input_ids": ids, **self.states}

    def step(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Feed one token per sequence; returns logits ``[batch, vocab]`` and advances the state."""
        res = self._sess.run(self._outputs, self.feeds(token_ids))
        by_name = dict(zip(self._outputs, res, strict=True))
        self.states = {name: by_name[out] for name, out in self._state_out.items()}
        return res[0][:, -1]

    def prefill(self, ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Reset and step through ``ids`` ``[batch, T]``; returns the logits of the last position."""
        arr = _as_2d(ids)
        self.reset(arr.shape[0])
        logits = None
        for t in range(arr.shape[1]):
            logits = self.step(arr[:, t])
        assert logits is not None
        return logits

    def teacher_forced_logits(self, ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Reset, step through ``ids`` ``[batch, T]`` and return all logits ``[batch, T, vocab]``."""
        arr = _as_2d(ids)
        self.reset(arr.shape[0])
        return np.stack([self.step(arr[:, t]) for t in range(arr.shape[1])], axis=1)

    def calibration_feeds(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[dict[str, np.ndarray]]:
        """Teacher-force ``ids`` ``[batch, T]`` and return the ``T`` feed dicts the graph saw.

        Calibration data for a step graph: each feed holds ``input_ids`` and the states
        this session computed up to that position (use an FP32 session).
        """
        arr = _as_2d(ids)
        self.reset(arr.shape[0])
        feeds = []
        for t in range(arr.shape[1]):
            feeds.append(self.feeds(arr[:, t]))
            self.step(arr[:, t])
        return feeds

    def generate(self, ids: np.ndarray | Sequence[Sequence[int]], max_new_tokens: int) -> np.ndarray:
        """Greedy decoding: the prompt ``ids`` ``[batch, T]`` followed by ``max_new_tokens`` tokens."""
        arr = _as_2d(ids)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        out = [arr]
        if max_new_tokens == 0:
            return arr
        logits = self.prefill(arr)
        for i in range(max_new_tokens):
            nxt = np.argmax(logits, axis=-1).astype(np.int64)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return np.concatenate(out, axis=1)


def _as_2d(ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"token ids must be [batch, T] with T >= 1, got shape {arr.shape}")
    return arr
