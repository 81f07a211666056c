"""Run exported decoders (``onnxq export --task text-generation``) in onnxruntime.

:class:`DecoderSession` keeps the state of a batch of sequences between calls -- the
attention mask, the next positions and the KV cache -- so that callers only hand it
token ids::

    session = DecoderSession("model.onnx")
    logits = session.prefill(prompt_ids)          # [batch, prompt, vocab]
    logits = session.step(logits[:, -1].argmax(-1))  # [batch, 1, vocab]

:func:`generate` decodes greedily; :func:`teacher_forced_logits` gives the logits of a
prefill followed by decode steps on known tokens (what the fidelity check compares).

The graph contract is the one of :mod:`onnxq.exporters.decoder`: inputs ``input_ids``,
``attention_mask``, optional ``position_ids`` and ``past_key_values.{i}.key|value``
``[batch, kv_heads, past, head_dim]``; outputs ``logits`` and ``present.{i}.key|value``.
A graph whose cache is stored differently (a quantized KV cache, say) can subclass
:class:`DecoderSession` and override :meth:`DecoderSession.empty_past` and
:meth:`DecoderSession.store_presents`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import numpy as np

from onnxq.errors import ModelLoadError, OnnxqError

__all__ = ["DecoderSession", "KVInput", "generate", "teacher_forced_logits"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = "present.{layer}.{kind}"

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


@dataclasses.dataclass(frozen=True)
class KVInput:
    """One past key or value input of the graph.

    Attributes:
        name: Graph input name (``past_key_values.{layer}.{kind}``).
        layer: Decoder layer index.
        kind: ``"key"`` or ``"value"``.
        output: Name of the matching present output.
        shape: Declared shape; symbolic axes are strings (or ``None``).
        dtype: NumPy dtype of the input.
    """

    name: str
    layer: int
    kind: str
    output: str
    shape: tuple[Any, ...]
    dtype: Any


def _make_session(model: Any, providers: list[str] | None, optimize: bool) -> Any:
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, (bytes, bytearray)):
        data: Any = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        path = pathlib.Path(model)
        if not path.is_file():
            raise ModelLoadError(f"no ONNX model at {path}")
        data = str(path)
    else:  # an onnx_ir.Model (or anything onnx_ir can serialize)
        import onnx_ir as ir

        data = ir.serde.serialize_model(model).SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load the decoder: {exc}".splitlines()[0][:300]) from exc


class DecoderSession:
    """An onnxruntime session of an exported decoder plus the state of one batch.

    Args:
        model: Path of an ``.onnx`` file, serialized model bytes, an ``onnx_ir.Model``, or
            an existing ``onnxruntime.InferenceSession``.
        providers: onnxruntime execution providers (default CPU).
        optimize: Let onnxruntime optimize the graph (default); ``False`` runs it as is.

    Attributes:
        session: The onnxruntime session.
        kv_inputs: Past inputs in layer order (key before value).
        num_layers: Number of decoder layers.
        attention_mask: Mask of everything fed so far, ``[batch, past]`` (int64).
        past: Current cache, by input name.
    """

    def __init__(self, model: Any, *, providers: list[str] | None = None, optimize: bool = True) -> None:
        self.session = _make_session(model, providers, optimize)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise OnnxqError(f"the decoder graph has no {required!r} input")
        if "logits" not in outputs:
            raise OnnxqError("the decoder graph has no 'logits' output")
        kv: list[KVInput] = []
        for name, arg in inputs.items():
            match = _PAST.match(name)
            if not match:
                continue
            layer, kind = int(match.group(1)), match.group(2)
            output = _PRESENT.format(layer=layer, kind=kind)
            if output not in outputs:
                raise OnnxqError(f"the decoder graph has input {name!r} but no output {output!r}")
            dtype = _NUMPY_TYPES.get(arg.type)
            if dtype is None:
                raise OnnxqError(f"unsupported type {arg.type} of decoder input {name!r}")
            kv.append(KVInput(name, layer, kind, output, tuple(arg.shape), dtype))
        kv.sort(key=lambda item: (item.layer, item.kind != "key"))
        self.kv_inputs = kv
        self.num_layers = len({item.layer for item in kv})
        self.has_position_ids = "position_ids" in inputs
        self.input_names = list(inputs)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.vocab_size = self._static_dim(self.session.get_outputs()[0].shape, -1)
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)
        self.past: dict[str, np.ndarray] = {}
        self._next_position = np.zeros((0, 1), dtype=np.int64)

    # ------------------------------------------------------------------ state hooks

    @staticmethod
    def _static_dim(shape: Any, axis: int) -> int | None:
        try:
            value = list(shape)[axis]
        except (TypeError, IndexError):
            return None
        return value if isinstance(value, int) else None

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0 for ``batch`` sequences, by input name.

        Subclasses with another cache layout override this.
        """
        meta = self.metadata
        fallback = {1: meta.get("onnxq.num_kv_heads"), 3: meta.get("onnxq.head_dim")}
        past = {}
        for item in self.kv_inputs:
            if len(item.shape) != 4:
                raise OnnxqError(f"past input {item.name!r} is not [batch, kv_heads, past, head_dim]")
            shape = [batch, 0, 0, 0]  # [batch, kv_heads, past = 0, head_dim]
            for axis in (1, 3):
                dim = item.shape[axis]
                if not isinstance(dim, int):
                    if fallback[axis] is None:
                        raise OnnxqError(f"axis {axis} of {item.name!r} is symbolic and the model has no metadata for it")
                    dim = int(fallback[axis])
                shape[axis] = dim
            past[item.name] = np.zeros(shape, dtype=item.dtype)
        return past

    def store_presents(self, outputs: dict[str, np.ndarray]) -> None:
        """Keep the present tensors of one run as the past of the next.

        Subclasses with another cache layout override this.
        """
        self.past = {item.name: outputs[item.output] for item in self.kv_inputs}

    @property
    def past_length(self) -> int:
        """Number of positions in the cache (including padding)."""
        return int(self.attention_mask.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    # ------------------------------------------------------------------ running

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One graph run on top of the current cache; updates the cache, returns logits."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if self.has_position_ids:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        feeds.update(self.past)
        names = ["logits", *(item.output for item in self.kv_inputs)]
        values = self.session.run(names, feeds)
        outputs = dict(zip(names, values))
        self.store_presents(outputs)
        self.attention_mask = feeds["attention_mask"]
        return outputs["logits"]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Start new sequences: run the prompt with an empty cache.

        Args:
            input_ids: ``[batch, sequence]`` (or ``[sequence]``) token ids; padded rows are
                padded on the left.
            attention_mask: ``[batch, sequence]``, 0 at padding; default all ones.

        Returns:
            Logits ``[batch, sequence, vocab]``.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise OnnxqError(f"input_ids must be [batch, sequence] with sequence > 0, got {ids.shape}")
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != ids.shape:
            raise OnnxqError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        batch = ids.shape[0]
        self.past = self.empty_past(batch)
        self.attention_mask = np.zeros((batch, 0), dtype=np.int64)
        # As transformers' generate(): positions count real tokens; padding gets 1.
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        self._next_position = (np.cumsum(mask, axis=1)[:, -1:]).astype(np.int64)
        return self.run(ids, mask, positions)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Feed the next token(s) of every sequence on top of the cache.

        Args:
            token_ids: ``[batch]`` (one token per sequence) or ``[batch, n]``.

        Returns:
            Logits ``[batch, n, vocab]``.
        """
        if not self.past and self.kv_inputs:
            raise OnnxqError("step() before prefill()")
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim == 0:
            ids = ids.reshape(1, 1)
        elif ids.ndim == 1:
            ids = ids[:, None]
        if ids.shape[0] != self.batch_size:
            raise OnnxqError(f"step() got {ids.shape[0]} sequences, the cache holds {self.batch_size}")
        n = ids.shape[1]
        mask = np.concatenate([self.attention_mask, np.ones((self.batch_size, n), np.int64)], axis=1)
        positions = self._next_position + np.arange(n, dtype=np.int64)[None]
        self._next_position = self._next_position + n
        return self.run(ids, mask, positions)


def _as_session(model: Any) -> DecoderSession:
    return model if isinstance(model, DecoderSession) else DecoderSession(model)


def generate(
    model_path_or_session: Any,
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    attention_mask: np.ndarray | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Greedy decoding with the exported graph, like ``model.generate(do_sample=False)``.

    Args:
        model_path_or_session: A :class:`DecoderSession` or anything it accepts.
        input_ids: Prompt ``[batch, sequence]`` (or ``[sequence]``), left-padded.
        max_new_tokens: Number of tokens to add at most.
        eos_token_id: Stop a sequence after it emits this token; later positions of a
            finished sequence get ``pad_token_id``.  Decoding ends when all are finished.
        attention_mask: Prompt mask (0 at padding); default all ones.
        pad_token_id: Filler after EOS (default ``eos_token_id``).

    Returns:
        ``[batch, sequence + new]`` int64: the prompt followed by the generated tokens.
    """
    session = _as_session(model_path_or_session)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    tokens = [ids]
    if max_new_tokens <= 0:
        return ids
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = np.zeros(ids.shape[0], dtype=bool)
    logits = session.prefill(ids, attention_mask)
    for index in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(axis=-1).astype(np.int64)
        if eos_token_id is not None:
            next_ids = np.where(finished, pad if pad is not None else 0, next_ids)
            finished |= next_ids == eos_token_id
        tokens.append(next_ids[:, None])
        if finished.all() or index == max_new_tokens - 1:
            break
        logits = session.step(next_ids)
    return np.concatenate(tokens, axis=1)


def teacher_forced_logits(session: Any, input_ids: np.ndarray, prefill_len: int) -> np.ndarray:
    """Logits of a prefill followed by one decode step per remaining token.

    The first ``prefill_len`` tokens are fed in one prefill run; tokens
    ``prefill_len .. T-1`` are then fed one at a time on top of the cache.  Row 0 holds
    the logits of the last prefill position (the prediction of token ``prefill_len``),
    row ``k`` those after feeding token ``prefill_len + k - 1``.

    Args:
        session: A :class:`DecoderSession` or anything it accepts.
        input_ids: ``[T]`` or ``[batch, T]`` token ids (no padding).
        prefill_len: Prompt length, ``1 <= prefill_len <= T``.

    Returns:
        ``[steps, vocab]`` for a 1-D input or a batch of one, else
        ``[batch, steps, vocab]``, with ``steps = T - prefill_len + 1``.
    """
    session = _as_session(session)
    ids = np.asarray(input_ids, dtype=np.int64)
    squeeze = ids.ndim == 1 or ids.shape[0] == 1
    if ids.ndim == 1:
        ids = ids[None]
    total = ids.shape[1]
    if not 1 <= prefill_len <= total:
        raise OnnxqError(f"prefill_len must be between 1 and {total}, got {prefill_len}")
    rows = [session.prefill(ids[:, :prefill_len])[:, -1]]
    for position in range(prefill_len, total):
        rows.append(session.step(ids[:, position])[:, -1])
    out = np.stack(rows, axis=1)
    return out[0] if squeeze else out
