"""Recipes: the frozen configuration of one conversion, readable from TOML.

A recipe says *what* to do (target, observers, which outlier methods, which
layers stay in floating point); :mod:`onnxq.pipeline` turns it into the ordered
list of passes.

Example ``recipe.toml``::

    target = "tensorrt"
    method = "percentile"
    samples = 256
    keep_fp = ["encoder.layer.5.output.dense"]
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from onnxq.calibration.observers import OBSERVER_METHODS
from onnxq.errors import OnnxqError
from onnxq.targets.profiles import TARGETS

__all__ = ["OUTLIER_METHODS", "Recipe", "load_recipe"]

# "auto" picks per site from the calibration statistics.
# "hadamard" (QuaRot rotations) is applied by onnxq.llm.convert_decoder (decoders only).
OUTLIER_METHODS = ("none", "auto", "smoothquant", "osplus", "osplus-shift", "ffn-scaling", "peg",
                   "hadamard", "mosf")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Configuration of a conversion.

    Attributes:
        target: deployment profile: "ort-cpu", "tensorrt" or "jetson".
        method: activation range estimator: minmax, percentile, entropy or mse.
        samples: calibration samples to use (``None`` = all).
        batch_size: calibration batch size.
        seq_len: maximum tokens per text sample.
        batch_tokens: padded tokens per text calibration batch at most (rows ×
            longest row); bounds calibration memory whatever the sample count.
        keep_fp: module paths or tensor names (globs) left in floating point.
        quantize_attention: quantize Q·Kᵀ and P·V (``None`` = the target's default).
        outliers: outlier method(s) applied before calibration.
        validate_samples: held-out samples used to measure fidelity.
        opset: opset for exports.
        int8_embeddings: store large embedding tables as int8 rows.
        embedding_bits: 8, or 4 for int4 embedding rows packed two per byte.
        weight_bits: 8, or 4 for blocked int4 linear weights (W4A8; opset 21).
        block_size: rows per int4 weight block.
        kv_bits: decoders only: store the KV cache as 8/4/2-bit codes (RotateKV).
        kv_group_size: channels per KV quantization group (None: 128 or head_dim).
    """

    target: str = "tensorrt"
    method: str = "percentile"
    samples: int | None = 256
    batch_size: int = 32
    seq_len: int = 128
    batch_tokens: int = 1024
    keep_fp: tuple[str, ...] = ()
    quantize_attention: bool | None = None
    outliers: tuple[str, ...] = ("auto",)
    validate_samples: int = 256
    opset: int = 21
    int8_embeddings: bool = True
    embedding_bits: int = 8
    kv_bits: int | None = None
    kv_group_size: int | None = None
    weight_bits: int = 8
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise OnnxqError(
                f"unknown target {self.target!r}; choose one of: {', '.join(sorted(TARGETS))}"
            )
        if self.method not in OBSERVER_METHODS:
            raise OnnxqError(
                f"unknown calibration method {self.method!r}; choose one of: "
                f"{', '.join(OBSERVER_METHODS)}"
            )
        for m in self.outliers:
            if m not in OUTLIER_METHODS:
                raise OnnxqError(
                    f"unknown outlier method {m!r}; choose from: {', '.join(OUTLIER_METHODS)}"
                )
        if self.samples is not None and self.samples <= 0:
            raise OnnxqError("samples must be a positive number")
        if self.weight_bits not in (4, 8):
            raise OnnxqError(f"weight bits must be 8 or 4, not {self.weight_bits}")
        if self.embedding_bits not in (4, 8):
            raise OnnxqError(f"embedding bits must be 8 or 4, not {self.embedding_bits}")
        if self.batch_size <= 0 or self.seq_len <= 0 or self.validate_samples < 0:
            raise OnnxqError("batch size, sequence length and validate samples must be positive")
        if self.batch_tokens <= 0:
            raise OnnxqError(f"batch tokens must be a positive number, not {self.batch_tokens}")
        if self.kv_bits is not None and self.kv_bits not in (2, 4, 8):
            raise OnnxqError(f"KV-cache bits must be 8, 4 or 2, not {self.kv_bits}")
        if self.kv_group_size is not None and self.kv_group_size <= 0:
            raise OnnxqError("KV-cache group size must be positive")
        if self.block_size <= 0:
            raise OnnxqError(f"block size must be a positive number, not {self.block_size}")
        if self.opset <= 0:
            raise OnnxqError(f"opset must be a positive number, not {self.opset}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied (validated like a new Recipe)."""
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def recipe_from_mapping(data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
    """Build a Recipe from a mapping, rejecting unknown keys and wrong types."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise OnnxqError(f"{source}: unknown key {key!r}; known keys: {', '.join(_FIELDS)}")
        if key in ("keep_fp", "outliers"):
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise OnnxqError(f"{source}: {key} must be a list of strings")
            value = tuple(value)
        elif key in ("samples", "batch_size", "seq_len", "batch_tokens", "validate_samples", "opset",
                     "weight_bits", "embedding_bits", "block_size", "kv_bits", "kv_group_size"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise OnnxqError(f"{source}: {key} must be an integer")
        elif key in ("quantize_attention", "int8_embeddings"):
            if not isinstance(value, bool):
                raise OnnxqError(f"{source}: {key} must be true or false")
        elif not isinstance(value, str):
            raise OnnxqError(f"{source}: {key} must be a string")
        kwargs[key] = value
    return Recipe(**kwargs)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a TOML recipe file; one-line errors for unreadable or invalid files."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise OnnxqError(f"recipe file {path} does not exist") from None
    except IsADirectoryError:
        raise OnnxqError(f"recipe file {path} is a folder, not a file") from None
    except OSError as exc:
        raise OnnxqError(f"recipe file {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OnnxqError(f"recipe file {path} is not valid TOML: {exc}".splitlines()[0]) from None
    return recipe_from_mapping(data, source=str(path))
