"""Calibration data: reading text or array files and turning them into feed batches.

A :class:`CalibrationData` is a re-iterable source of ``dict[str, np.ndarray]``
feeds for ``onnxruntime.InferenceSession.run``.  Batches are produced lazily,
one at a time, so iterating over a large set never holds all of it in memory.

Sources:

* ``.txt`` - one sample per non-empty line (UTF-8);
* ``.jsonl`` - one JSON object per line, the text in a field (default ``"text"``);
* ``.npz`` - arrays named like the model inputs, first axis = sample;
* ``None`` - the embedded default English text (:mod:`onnxq.calibration.default_text`).

Every user error raises :class:`onnxq.errors.CalibrationDataError` with a one-line
message that names the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from onnxq.calibration import default_text
from onnxq.errors import CalibrationDataError

__all__ = [
    "Batch",
    "InputSpec",
    "CalibrationData",
    "SUPPORTED_EXTENSIONS",
    "load_tokenizer",
    "read_texts",
    "text_batches",
    "npz_batches",
    "load_calibration",
    "input_specs",
]

#: A feed for ``onnxruntime``: input name -> array.
Batch = dict[str, np.ndarray]

#: File extensions :func:`load_calibration` understands.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".npz")

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_SPLITS = ("calib", "heldout")


def _error(message: str) -> CalibrationDataError:
    """Build a CalibrationDataError whose message is guaranteed to be one line."""
    return CalibrationDataError(" ".join(message.splitlines()))


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input of the model to calibrate.

    Attributes:
        name: Input name.
        dtype: Element type as a numpy dtype (e.g. ``np.dtype("int64")``).
        shape: Dimensions from the graph; an ``int`` is fixed, a ``str`` (symbolic
            name) or ``None`` is dynamic.  ``None`` for the whole shape means the
            graph does not declare a rank.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    def fixed_dim(self, axis: int) -> int | None:
        """The fixed size of ``axis``, or ``None`` when it is dynamic or unknown."""
        if self.shape is None or axis >= len(self.shape):
            return None
        dim = self.shape[axis]
        return dim if isinstance(dim, int) else None


class CalibrationData:
    """A re-iterable source of feed batches.

    Batches are built on demand by a ``make_batch(index)`` callable, so
    iterating never materialises the whole data set.

    Attributes:
        num_samples: Total number of samples over all batches.
        description: Short human-readable description of the source.
    """

    def __init__(
        self,
        make_batch: Callable[[int], Batch],
        num_batches: int,
        num_samples: int,
        description: str = "",
    ) -> None:
        """Create a data source.

        Args:
            make_batch: Builds batch ``i`` for ``0 <= i < num_batches``.
            num_batches: Number of batches.
            num_samples: Total number of samples.
            description: Short description, e.g. the file name.
        """
        self._make_batch = make_batch
        self._num_batches = num_batches
        self.num_samples = num_samples
        self.description = description

    def __iter__(self) -> Iterator[Batch]:
        for index in range(self._num_batches):
            yield self._make_batch(index)

    def __len__(self) -> int:
        return self._num_batches

    def __repr__(self) -> str:
        return (
            f"CalibrationData({self.description!r}, batches={self._num_batches}, "
            f"samples={self.num_samples})"
        )


# --- files -------------------------------------------------------------------


def _check_file(path: Path, what: str = "calibration file") -> None:
    if not path.exists():
        raise _error(f"{what} {path} does not exist")
    if path.is_dir():
        raise _error(f"{what} {path} is a directory, not a file")


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = ext or "no extension"
        raise _error(
            f"calibration file {path} has unsupported type ({shown}); "
            f"use {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return ext


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """Load a Hugging Face ``tokenizers`` tokenizer.

    Args:
        path: A ``tokenizer.json`` file or a folder that contains one.

    Returns:
        The tokenizer.

    Raises:
        CalibrationDataError: The file is missing or cannot be parsed.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        if path.is_dir():
            raise _error(f"tokenizer folder {path} has no tokenizer.json")
        raise _error(f"tokenizer file {file} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        reason = str(exc).strip() or type(exc).__name__
        raise _error(f"tokenizer file {file} cannot be read: {reason}") from exc


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _error(f"calibration file {path} cannot be read: {exc.strerror or exc}") from exc
    if b"\x00" in raw:
        raise _error(f"calibration file {path} looks binary (contains NUL bytes), not UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _error(
            f"calibration file {path} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from exc


def read_texts(path: str | os.PathLike[str], *, text_field: str = "text") -> list[str]:
    """Read text samples from a ``.txt`` or ``.jsonl`` file.

    Args:
        path: The file.  ``.txt``: one sample per non-empty line (stripped).
            ``.jsonl``: one JSON object per non-empty line, the sample in
            ``text_field``.
        text_field: Field that holds the text in ``.jsonl`` records.

    Returns:
        The samples in file order.

    Raises:
        CalibrationDataError: Missing, unreadable or binary file, unsupported
            extension, malformed JSON line, missing or non-string field, or no
            samples at all.
    """
    path = Path(path)
    _check_file(path)
    ext = _extension(path)
    if ext == ".npz":
        raise _error(f"calibration file {path} holds arrays (.npz), not text; expected .txt or .jsonl")
    content = _read_text_file(path)
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if ext == ".txt":
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(f"calibration file {path} line {number}: malformed JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise _error(
                f"calibration file {path} line {number}: expected a JSON object, "
                f"got {type(record).__name__}"
            )
        if text_field not in record:
            raise _error(f"calibration file {path} line {number}: field {text_field!r} is missing")
        value = record[text_field]
        if not isinstance(value, str):
            raise _error(
                f"calibration file {path} line {number}: field {text_field!r} is "
                f"{type(value).__name__}, not a string"
            )
        if value.strip():
            texts.append(value.strip())
    if not texts:
        raise _error(f"calibration file {path} holds no samples")
    return texts


# --- batching helpers ----------------------------------------------------------


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise _error(f"{name} must be a positive integer, got {value!r}")


def _effective_batch_size(inputs: Sequence[InputSpec], batch_size: int, source: str) -> int:
    """Batch size to use: ``batch_size`` unless the graph fixes the batch axis."""
    fixed = {spec.name: spec.fixed_dim(0) for spec in inputs if spec.fixed_dim(0) is not None}
    if not fixed:
        return batch_size
    sizes = set(fixed.values())
    if len(sizes) > 1:
        detail = ", ".join(f"{name}={size}" for name, size in fixed.items())
        raise _error(f"{source}: model inputs fix different batch sizes ({detail})")
    return sizes.pop()


def _batch_count(num_samples: int, batch_size: int, fixed_batch: bool, source: str) -> tuple[int, int]:
    """Return ``(num_batches, used_samples)``; a fixed batch axis drops the remainder."""
    if fixed_batch:
        if num_samples < batch_size:
            raise _error(
                f"{source}: the model needs batches of exactly {batch_size} samples "
                f"but only {num_samples} are available"
            )
        num_batches = num_samples // batch_size
        return num_batches, num_batches * batch_size
    return -(-num_samples // batch_size), num_samples


def _limit_samples(samples: int | None, available: int) -> int:
    if samples is None:
        return available
    _check_positive("samples", samples)
    return min(int(samples), available)


# --- text ----------------------------------------------------------------------


def _token_budget_bounds(lengths: Sequence[int], max_rows: int, budget: int) -> list[tuple[int, int]]:
    """Greedy, order-preserving ``(start, stop)`` batches with ``rows · longest ≤ budget``."""
    bounds: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        rows = i - start
        wider = max(longest, length)
        if rows and (rows >= max_rows or (rows + 1) * wider > budget):
            bounds.append((start, i))
            start, wider = i, length
        longest = wider
    if lengths:
        bounds.append((start, len(lengths)))
    return bounds


def _pad_id(tokenizer: tokenizers.Tokenizer) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def text_batches(
    texts: Sequence[str],
    tokenizer: tokenizers.Tokenizer,
    inputs: Sequence[InputSpec],
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    batch_tokens: int | None = None,
) -> CalibrationData:
    """Tokenize texts and batch them as ``input_ids``/``attention_mask``/``token_type_ids``.

    Each batch is padded to its longest sample (not to ``seq_len``) unless the
    graph fixes the sequence axis, in which case every batch is padded to that
    length.  A graph with a fixed batch axis gets batches of exactly that size
    (the incomplete last batch is dropped).  The tokenizer passed in is not
    modified.

    With ``batch_tokens``, consecutive samples are packed greedily, in order, into
    batches of at most ``batch_size`` rows whose padded size (rows × longest row)
    stays within ``batch_tokens`` (a single longer sample still forms its own
    batch).  The activations onnxruntime returns per batch, and with them the peak
    memory of calibration, are then bounded by the budget, whatever the number of
    samples and however long the longest of them is.

    Args:
        texts: The samples.
        tokenizer: A ``tokenizers.Tokenizer`` (its post-processor adds special tokens).
        inputs: The model's graph inputs.
        batch_size: Samples per batch.
        seq_len: Maximum tokens per sample (longer samples are truncated).
        batch_tokens: Padded tokens per batch at most (None: no budget).  Ignored
            when the graph fixes the batch axis.

    Returns:
        The batches; arrays are cast to each input's dtype.

    Raises:
        CalibrationDataError: No texts, no ``input_ids`` input, an input the
            text pipeline cannot fill, a non-integer text input, or a fixed
            shape that cannot be met.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if len(texts) == 0:
        raise _error("text calibration data holds no samples")
    by_name = {spec.name: spec for spec in inputs}
    if "input_ids" not in by_name:
        names = ", ".join(by_name) or "none"
        raise _error(f"text calibration data needs a model input named input_ids (model inputs: {names})")
    for spec in inputs:
        if spec.name not in _TEXT_INPUTS:
            raise _error(
                f"text calibration data cannot fill model input {spec.name!r} "
                f"({spec.dtype}); use an .npz file with an array named {spec.name}"
            )
        if spec.dtype.kind not in "iu":
            raise _error(f"model input {spec.name!r} has dtype {spec.dtype}; text inputs must be integers")
        if spec.shape is not None and len(spec.shape) != 2:
            raise _error(
                f"model input {spec.name!r} has rank {len(spec.shape)}; text inputs must be [batch, sequence]"
            )
    fixed_seq = {spec.fixed_dim(1) for spec in inputs} - {None}
    if len(fixed_seq) > 1:
        raise _error("text calibration data: model inputs fix different sequence lengths")
    pad_to = fixed_seq.pop() if fixed_seq else None
    max_len = min(seq_len, pad_to) if pad_to is not None else seq_len

    work = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # leave the caller's tokenizer alone
    work.no_padding()
    work.enable_truncation(max_length=max_len)
    try:
        encodings = work.encode_batch(list(texts))
    except Exception as exc:
        raise _error(f"text calibration data cannot be tokenized: {exc}") from exc
    ids = [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]
    pad_id = _pad_id(tokenizer)

    size = _effective_batch_size(inputs, batch_size, "text calibration data")
    fixed_batch = any(spec.fixed_dim(0) is not None for spec in inputs)
    num_batches, used = _batch_count(len(ids), size, fixed_batch, "text calibration data")
    if batch_tokens is not None:
        _check_positive("batch_tokens", batch_tokens)
    if batch_tokens is None or fixed_batch:
        bounds = [(i * size, min((i + 1) * size, used)) for i in range(num_batches)]
    else:
        bounds = _token_budget_bounds([pad_to or max(1, len(row)) for row in ids], size, batch_tokens)
        num_batches = len(bounds)

    def make_batch(index: int) -> Batch:
        start, stop = bounds[index]
        rows = ids[start:stop]
        width = pad_to if pad_to is not None else max(1, max(len(row) for row in rows))
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
        return {spec.name: arrays[spec.name].astype(spec.dtype, copy=False) for spec in inputs}

    return CalibrationData(make_batch, num_batches, used, f"{used} text samples")


# --- npz -----------------------------------------------------------------------


def _open_member(archive_path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map an uncompressed ``.npy`` member of a zip; load compressed ones."""
    info = archive.getinfo(name)
    with open(archive_path, "rb") as fp:
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            fp.seek(info.header_offset)
            local = fp.read(30)
            if local[:4] == b"PK\x03\x04":
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                fp.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
                if dtype.hasobject:
                    raise ValueError("object arrays are not allowed")
                if int(np.prod(shape)) == 0:
                    return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
                return np.memmap(
                    archive_path, dtype=dtype, mode="r", offset=fp.tell(), shape=shape,
                    order="F" if fortran else "C",
                )
    with archive.open(name) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Open every array of an ``.npz`` lazily (memory-mapped when stored uncompressed)."""
    try:
        with np.load(path, mmap_mode="r", allow_pickle=False) as npz:
            names = list(npz.files)
        arrays: dict[str, np.ndarray] = {}
        with zipfile.ZipFile(path) as archive:
            members = {m[:-4] if m.endswith(".npy") else m: m for m in archive.namelist()}
            for name in names:
                arrays[name] = _open_member(path, archive, members[name])
        return arrays
    except CalibrationDataError:
        raise
    except Exception as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise _error(f"calibration file {path} is not a readable .npz archive: {reason}") from exc


def _castable(have: np.dtype, want: np.dtype) -> bool:
    if want.kind in "iu":
        return have.kind in "iub"
    if want.kind == "f":
        return have.kind == "f"
    if want.kind == "b":
        return have.kind == "b"
    return np.can_cast(have, want, casting="same_kind")


def _scan_values(path: Path, name: str, array: np.ndarray, want: np.dtype, count: int) -> None:
    """Check NaN/Inf and integer range chunk by chunk, without loading the array at once."""
    if array.size == 0 or count == 0:
        return
    check_finite = array.dtype.kind == "f"
    check_range = want.kind in "iu" and array.dtype.kind in "iu" and not np.can_cast(array.dtype, want)
    if not (check_finite or check_range):
        return
    row_bytes = max(1, array[:1].nbytes)
    chunk = max(1, (64 << 20) // row_bytes)
    info = np.iinfo(want) if check_range else None
    for start in range(0, count, chunk):
        part = np.asarray(array[start : min(start + chunk, count)])
        if check_finite and not np.isfinite(part).all():
            raise _error(f"calibration file {path}: array {name!r} contains NaN or Inf")
        if info is not None and (part.min() < info.min or part.max() > info.max):
            raise _error(
                f"calibration file {path}: array {name!r} has values outside the range of "
                f"{want} (model input {name!r})"
            )


def npz_batches(
    path: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    batch_size: int = 32,
    samples: int | None = None,
) -> CalibrationData:
    """Batch arrays from an ``.npz`` file whose arrays are named like the model inputs.

    Arrays stored uncompressed (``np.savez``) are memory-mapped and sliced per
    batch, so large files are never read at once; compressed members
    (``np.savez_compressed``) have to be decompressed into memory.

    Args:
        path: The ``.npz`` file; the first axis of every array is the sample axis.
        inputs: The model's graph inputs.
        batch_size: Samples per batch (overridden by a fixed batch axis in the graph).
        samples: Use only the first ``samples`` samples.

    Returns:
        The batches; arrays are cast to each input's dtype.

    Raises:
        CalibrationDataError: Missing or unreadable file, a missing or unknown
            array, an incompatible dtype, differing sample counts, a shape that
            does not fit the graph, or NaN/Inf values.
    """
    path = Path(path)
    _check_positive("batch_size", batch_size)
    _check_file(path)
    arrays = _load_npz(path)
    by_name = {spec.name: spec for spec in inputs}
    missing = [name for name in by_name if name not in arrays]
    if missing:
        raise _error(
            f"calibration file {path} has no array for model input(s) {', '.join(missing)} "
            f"(arrays: {', '.join(sorted(arrays)) or 'none'})"
        )
    extra = sorted(name for name in arrays if name not in by_name)
    if extra:
        raise _error(
            f"calibration file {path} has array(s) {', '.join(extra)} that match no model input "
            f"(inputs: {', '.join(by_name)})"
        )
    counts: dict[str, int] = {}
    for spec in inputs:
        array = arrays[spec.name]
        if not _castable(array.dtype, spec.dtype):
            raise _error(
                f"calibration file {path}: array {spec.name!r} has dtype {array.dtype} "
                f"but model input {spec.name!r} needs {spec.dtype}"
            )
        if array.ndim == 0:
            raise _error(f"calibration file {path}: array {spec.name!r} is a scalar; axis 0 must be samples")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise _error(
                    f"calibration file {path}: array {spec.name!r} has rank {array.ndim} "
                    f"but model input {spec.name!r} has rank {len(spec.shape)}"
                )
            for axis in range(1, array.ndim):
                want = spec.fixed_dim(axis)
                if want is not None and array.shape[axis] != want:
                    raise _error(
                        f"calibration file {path}: array {spec.name!r} has shape {tuple(array.shape)} "
                        f"but model input {spec.name!r} fixes axis {axis} to {want}"
                    )
        counts[spec.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{name}={count}" for name, count in counts.items())
        raise _error(f"calibration file {path}: arrays have different sample counts ({detail})")
    available = next(iter(counts.values()), 0)
    if available == 0:
        raise _error(f"calibration file {path} holds no samples")
    count = _limit_samples(samples, available)
    for spec in inputs:
        _scan_values(path, spec.name, arrays[spec.name], spec.dtype, count)

    size = _effective_batch_size(inputs, batch_size, f"calibration file {path}")
    fixed_batch = any(spec.fixed_dim(0) is not None for spec in inputs)
    num_batches, used = _batch_count(count, size, fixed_batch, f"calibration file {path}")

    def make_batch(index: int) -> Batch:
        start, stop = index * size, min((index + 1) * size, used)
        return {
            spec.name: np.ascontiguousarray(arrays[spec.name][start:stop], dtype=spec.dtype)
            for spec in inputs
        }

    return CalibrationData(make_batch, num_batches, used, str(path))


# --- entry points ------------------------------------------------------------------


def load_calibration(
    source: str | os.PathLike[str] | None,
    inputs: Sequence[InputSpec],
    *,
    tokenizer: str | os.PathLike[str] | tokenizers.Tokenizer | None = None,
    samples: int | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    text_field: str = "text",
    split: str = "calib",
    batch_tokens: int | None = None,
) -> CalibrationData:
    """Open calibration data for a model.

    Args:
        source: A ``.txt``/``.jsonl``/``.npz`` file, or ``None`` for the
            embedded default English text.
        inputs: The model's graph inputs (see :func:`input_specs`).
        tokenizer: ``tokenizer.json`` file or folder (or a loaded tokenizer);
            required for text sources, including the default text.
        samples: Use at most this many samples (the first N; for the default
            text a fixed, content-ordered subset).
        batch_size: Samples per batch.
        seq_len: Maximum tokens per text sample.
        text_field: Field holding the text in ``.jsonl`` records.
        split: For the default text: ``"calib"`` or ``"heldout"``.
        batch_tokens: Padded tokens per text batch at most (see :func:`text_batches`).

    Returns:
        The batches.

    Raises:
        CalibrationDataError: Any problem with the source, the tokenizer or
            their fit to the model inputs.
    """
    if samples is not None:
        _check_positive("samples", samples)
    if source is None:
        if tokenizer is None:
            raise _error(
                "text calibration data needs a tokenizer: pass one for the default "
                f"{split} text (tokenizer.json or its folder)"
            )
        if split not in _SPLITS:
            raise _error(f"unknown default text split {split!r}; use {' or '.join(_SPLITS)}")
        texts = (
            default_text.calibration_texts(samples) if split == "calib" else default_text.heldout_texts(samples)
        )
        where = f"the default {split} text"
    else:
        path = Path(source)
        _check_file(path)
        if _extension(path) == ".npz":
            return npz_batches(path, inputs, batch_size=batch_size, samples=samples)
        texts = read_texts(path, text_field=text_field)
        if samples is not None:
            texts = texts[:samples]
        where = str(path)
    if tokenizer is None:
        raise _error(f"text calibration data needs a tokenizer: pass one for {where} (tokenizer.json or its folder)")
    tok = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else load_tokenizer(tokenizer)
    data = text_batches(texts, tok, inputs, batch_size=batch_size, seq_len=seq_len,
                        batch_tokens=batch_tokens)
    data.description = f"{data.num_samples} text samples from {where}"
    return data


def input_specs(model: Any) -> list[InputSpec]:
    """Describe the graph inputs of an ``onnx_ir.Model`` that need feeding.

    Inputs that are also initializers (inputs with defaults) are skipped.

    Args:
        model: An ``onnx_ir.Model``.

    Returns:
        One :class:`InputSpec` per fed input, in graph order.
    """
    graph = model.graph
    initialized = set(graph.initializers)
    specs: list[InputSpec] = []
    for value in graph.inputs:
        if value.name in initialized:
            continue
        if value.dtype is None:
            raise _error(f"model input {value.name!r} has no element type; cannot build calibration feeds")
        dtype = np.dtype(value.dtype.numpy())
        shape: tuple[int | str | None, ...] | None = None
        if value.shape is not None:
            dims: list[int | str | None] = []
            for dim in value.shape:
                if isinstance(dim, int):
                    dims.append(int(dim))
                else:
                    dims.append(getattr(dim, "value", None))
            shape = tuple(dims)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def split_calibration(
    source: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    tokenizer: str | os.PathLike[str] | tokenizers.Tokenizer | None = None,
    samples: int | None = None,
    validate_samples: int = 256,
    batch_size: int = 32,
    seq_len: int = 128,
    text_field: str = "text",
    batch_tokens: int | None = None,
) -> tuple[CalibrationData, CalibrationData | None]:
    """Split a user's calibration file into calibration and held-out validation parts.

    The held-out part is taken from the end of the file (at most a fifth of it and
    at most ``validate_samples``) and never used for calibration.
    """
    path = Path(source)
    _check_file(path)
    if _extension(path) == ".npz":
        full = npz_batches(path, inputs, batch_size=batch_size)
        n = len(full)
        n_val = min(n // 5, -(-validate_samples // batch_size)) if validate_samples else 0
        n_cal = n - n_val
        if samples is not None:
            n_cal = min(n_cal, max(1, -(-samples // batch_size)))
        make = full._make_batch
        per = full.num_samples / max(n, 1)
        cal = CalibrationData(make, n_cal, min(full.num_samples, round(n_cal * per)),
                              f"{path} (calibration part)")
        val = None
        if n_val:
            val = CalibrationData(lambda i: make(n - n_val + i), n_val, round(n_val * per),
                                  f"{path} (held-out part)")
        return cal, val
    texts = read_texts(path, text_field=text_field)
    if tokenizer is None:
        raise _error(f"text calibration data needs a tokenizer: pass one for {path} "
                     "(tokenizer.json or its folder)")
    tok = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else load_tokenizer(tokenizer)
    n_val = min(len(texts) // 5, validate_samples) if validate_samples else 0
    cal_texts = texts[: len(texts) - n_val]
    if samples is not None:
        cal_texts = cal_texts[:samples]
    cal = text_batches(cal_texts, tok, inputs, batch_size=batch_size, seq_len=seq_len,
                       batch_tokens=batch_tokens)
    cal.description = f"{cal.num_samples} text samples from {path}"
    val = None
    if n_val:
        val = text_batches(texts[len(texts) - n_val:], tok, inputs, batch_size=batch_size,
                           seq_len=seq_len, batch_tokens=batch_tokens)
        val.description = f"{val.num_samples} held-out text samples from {path}"
    return cal, val
