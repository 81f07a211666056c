"""Run decoders whose KV cache was quantized by :class:`onnxq.passes.kv_cache.QuantizeKVCachePass`.

The quantized graph returns, per layer and kind, only the rows of the tokens fed in
the current run (``present.{i}.{k}`` packed uint8 codes, ``…_scale`` / ``…_zero``
float16, ``…_sink`` float16 side cache): :class:`QuantizedKVSession` appends them to
its cache along the sequence axis and feeds the whole cache back on the next run::

    session = QuantizedKVSession(model)            # an onnx_ir.Model, path or bytes
    logits = session.prefill(prompt_ids)
    logits = session.step(next_ids)
    session.cache_nbytes()                          # bytes the cache really holds

:func:`onnxq.runtime.generate` and :func:`onnxq.runtime.teacher_forced_logits`
accept a :class:`QuantizedKVSession` as they are.

Cache tensors the pass left in float (``kinds`` without ``"value"``, say) keep the
exported layout: their ``present`` output is the whole cache and replaces the past.

**Positions with a pre-RoPE key cache** (``key_placement = "pre_rope"`` in the
metadata): the graph re-applies RoPE to the cached keys at every run, giving the ``L``
cached tokens the positions ``position_ids[:, :1] − L + arange(L)``.  The positions
:class:`~onnxq.runtime.DecoderSession` feeds satisfy this: ``cumsum(mask) − 1`` on the
prompt (left padding: real tokens count from 0 after the padding, padded slots get 1
and are masked), then the next consecutive positions at every step.  A caller that
drives the graph itself must feed consecutive positions the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.runtime import _NUMPY_TYPES, DecoderSession, KVInput

__all__ = ["KV_CACHE_KEY", "QuantizedKVSession", "cache_bytes_per_token"]

KV_CACHE_KEY = "onnxq.kv_cache"
_COMPANION = re.compile(r"^past_key_values\.(\d+)\.(key|value)_(scale|zero|sink)$")


class QuantizedKVSession(DecoderSession):
    """A :class:`~onnxq.runtime.DecoderSession` for a packed, append-only KV cache.

    Also runs plain FP graphs (then it behaves like its base class).

    Attributes:
        kv_config: The settings the pass stored (``bits``, ``group_size``, ``sink_tokens``, …),
            empty for an FP graph.
    """

    def __init__(self, model: Any, *, providers: list[str] | None = None, optimize: bool = True) -> None:
        super().__init__(model, providers=providers, optimize=optimize)
        raw = self.metadata.get(KV_CACHE_KEY)
        self.kv_config: dict[str, Any] = json.loads(raw) if raw else {}
        if not self.kv_config:
            return
        if self.kv_config.get("rope_reapplied") and not self.has_position_ids:
            raise OnnxqError("the decoder caches pre-RoPE keys but has no position_ids input")
        outputs = {o.name for o in self.session.get_outputs()}
        extra = []
        for arg in self.session.get_inputs():
            match = _COMPANION.match(arg.name)
            if not match:
                continue
            layer, kind, part = int(match.group(1)), match.group(2), match.group(3)
            output = f"present.{layer}.{kind}_{part}"
            if output not in outputs:
                raise OnnxqError(f"the decoder graph has input {arg.name!r} but no output {output!r}")
            dtype = _NUMPY_TYPES.get(arg.type)
            if dtype is None:
                raise OnnxqError(f"unsupported type {arg.type} of decoder input {arg.name!r}")
            extra.append(KVInput(arg.name, layer, kind, output, tuple(arg.shape), dtype))
        self.kv_inputs = self.kv_inputs + extra
        self.kv_inputs.sort(key=lambda item: (item.layer, item.kind != "key", item.name))
        sites = self.kv_config.get("sites")
        if sites is None:  # graphs written before the metadata listed the sites
            kinds = self.kv_config.get("kinds", ["key", "value"])
            sites = [f"{item.layer}.{item.kind}" for item in self.kv_inputs if item.kind in kinds]
        self._appended = {item.name for item in self.kv_inputs if f"{item.layer}.{item.kind}" in set(sites)}

    @property
    def key_placement(self) -> str | None:
        """``"pre_rope"`` / ``"post_rope"`` for a quantized key cache, else None."""
        return self.kv_config.get("key_placement")

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        if not self.kv_config:
            return super().empty_past(batch)
        past = {}
        for item in self.kv_inputs:
            shape = list(item.shape)
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise OnnxqError(f"cache input {item.name!r} has shape {item.shape}; expected [batch, H, past, n]")
            past[item.name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=item.dtype)
        return past

    def store_presents(self, outputs: dict[str, np.ndarray]) -> None:
        if not self.kv_config:
            super().store_presents(outputs)
            return
        # Append-only layout: the graph returns the new rows; the cache grows here.
        # Caches the pass did not rewrite return the whole cache, as exported.
        self.past = {item.name: np.concatenate([self.past[item.name], outputs[item.output]], axis=2)
                     if item.name in self._appended else outputs[item.output]
                     for item in self.kv_inputs}

    def cache_nbytes(self) -> int:
        """Bytes held by the cache tensors fed to the next run (all layers, all parts)."""
        return int(sum(a.nbytes for a in self.past.values()))


def cache_bytes_per_token(session: DecoderSession, input_ids: np.ndarray) -> float:
    """Cache bytes per token and sequence after a prefill of ``input_ids`` ``[1, T]``.

    Measured from the arrays the session will feed back (``session.past``).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    session.prefill(ids)
    total = sum(a.nbytes for a in session.past.values())
    return total / (ids.shape[0] * ids.shape[1])
