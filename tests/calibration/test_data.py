"""Tests for onnxq.calibration.data and onnxq.calibration.default_text."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("onnxq") is None:  # repo not installed: import from the checkout
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, processors  # noqa: E402

from onnxq.calibration import default_text  # noqa: E402
from onnxq.calibration.data import (  # noqa: E402
    CalibrationData,
    InputSpec,
    input_specs,
    load_calibration,
    load_tokenizer,
    npz_batches,
    read_texts,
    text_batches,
)
from onnxq.errors import CalibrationDataError  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "slowly", "big", "red"]
PAD, UNK, CLS, SEP = 0, 1, 2, 3


def make_tokenizer(pad_token: str = "[PAD]") -> tokenizers.Tokenizer:
    vocab = {pad_token: PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    return make_tokenizer()


@pytest.fixture
def tokenizer_dir(tmp_path: Path, tokenizer: tokenizers.Tokenizer) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def bert_inputs(dtype=np.int64, token_types: bool = True) -> list[InputSpec]:
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    return [InputSpec(name, np.dtype(dtype), ("batch", "sequence")) for name in names]


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- read_texts -----------------------------------------------------------------


def test_read_txt_strips_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", "\ufeffthe cat sat\n\n   \n  a dog ran  \r\nbig red\n")
    assert read_texts(path) == ["the cat sat", "a dog ran", "big red"]


def test_read_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "the cat", "id": 1}), "", json.dumps({"text": "a dog", "x": [1]})]
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    assert read_texts(path) == ["the cat", "a dog"]
    other = write(tmp_path / "o.jsonl", json.dumps({"body": "red mat"}) + "\n")
    assert read_texts(other, text_field="body") == ["red mat"]


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("e.txt", "\n  \n\n"), ("e.jsonl", "\n\n")])
def test_read_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), "holds no samples")


def test_read_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), "line 3", "'text'", "missing")


def test_read_jsonl_malformed_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), "line 2", "malformed JSON")


@pytest.mark.parametrize("content", ['["a list"]\n', '"a string"\n'])
def test_read_jsonl_non_object(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "c.jsonl", content)
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), "line 1", "JSON object")


def test_read_jsonl_non_string_field(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": 12}\n')
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), "line 1", "not a string")


@pytest.mark.parametrize(
    "content", [bytes(range(256)) * 4, b"\xff\xfe\xfa bad utf8 \xc3\x28\n", b"ok line\x00\x01\x02\n"]
)
@pytest.mark.parametrize("name", ["g.txt", "g.jsonl"])
def test_read_binary_garbage(tmp_path: Path, name: str, content: bytes) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path))


@pytest.mark.parametrize("name", ["c.csv", "c", "c.json"])
def test_read_unknown_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "the cat\n")
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path), ".txt", ".jsonl", ".npz")


def test_read_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(tmp_path / "nope.txt")
    one_line_error(excinfo, "nope.txt", "does not exist")
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(folder)
    one_line_error(excinfo, "dir.txt", "directory")


def test_read_texts_rejects_npz(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, input_ids=np.zeros((2, 3), np.int64))
    with pytest.raises(CalibrationDataError) as excinfo:
        read_texts(path)
    one_line_error(excinfo, str(path))


# --- tokenizer ---------------------------------------------------------------------


def test_load_tokenizer_folder_and_file(tokenizer_dir: Path) -> None:
    for path in (tokenizer_dir, tokenizer_dir / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert tok.encode("the cat").ids == [CLS, 4, 5, SEP]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError) as excinfo:
        load_tokenizer(tmp_path)
    one_line_error(excinfo, str(tmp_path), "tokenizer.json")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_tokenizer(tmp_path / "missing.json")
    one_line_error(excinfo, "missing.json", "does not exist")
    bad = write(tmp_path / "tokenizer.json", "{not json")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_tokenizer(bad)
    one_line_error(excinfo, str(bad), "cannot be read")


# --- text_batches -----------------------------------------------------------------


def test_text_batches_shapes_padding_masks(tokenizer: tokenizers.Tokenizer) -> None:
    texts = ["the cat sat on the mat", "a dog", "red", "big dog ran fast", "zebra"]
    data = text_batches(texts, tokenizer, bert_inputs(), batch_size=2, seq_len=128)
    assert isinstance(data, CalibrationData)
    assert len(data) == 3 and data.num_samples == 5
    batches = list(data)
    assert len(batches) == 3
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids"}
    # padded to the longest sample in the batch (6 words + CLS + SEP), not to seq_len
    assert first["input_ids"].shape == (2, 8)
    assert first["input_ids"][0].tolist() == [CLS, 4, 5, 6, 7, 4, 8, SEP]
    assert first["input_ids"][1].tolist() == [CLS, 9, 10, SEP, PAD, PAD, PAD, PAD]
    assert first["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert not first["token_type_ids"].any()
    assert batches[1]["input_ids"].shape == (2, 6)
    assert batches[2]["input_ids"].tolist() == [[CLS, UNK, SEP]]
    for batch in batches:
        for array in batch.values():
            assert array.dtype == np.int64
    # re-iterable and identical
    again = list(data)
    for a, b in zip(batches, again, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_text_batches_token_budget(tokenizer: tokenizers.Tokenizer) -> None:
    words = "the cat sat on the mat a dog red big ran fast zebra".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(200)]
    plain = list(text_batches(texts, tokenizer, bert_inputs(), batch_size=16, seq_len=24))
    budget = 96
    data = text_batches(texts, tokenizer, bert_inputs(), batch_size=16, seq_len=24, batch_tokens=budget)
    batches = list(data)
    assert data.num_samples == 200 and len(data) == len(batches) > len(plain)
    rows = [b["input_ids"].shape[0] for b in batches]
    assert max(rows) <= 16
    # every batch fits the budget (24 tokens at most per row, so never a lone oversize row)
    assert max(b["input_ids"].size for b in batches) <= budget
    assert max(b["input_ids"].size for b in plain) > budget  # the budget did something
    # same samples, same order: unpadded rows concatenate to the unbudgeted ones
    def rows_of(bs):
        return [r[m.astype(bool)].tolist() for b in bs
                for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert rows_of(batches) == rows_of(plain)
    # greedy: adding the next sample to a batch would have broken the budget or the row cap
    starts = np.cumsum([0] + rows)
    lengths = [len(r) for r in rows_of(plain)]
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        if b < len(lengths):
            assert b - a == 16 or (b - a + 1) * max(lengths[a:b + 1]) > budget, i


def test_text_batches_token_budget_single_long_row(tokenizer: tokenizers.Tokenizer) -> None:
    texts = ["the cat sat on the mat " * 5, "a dog", "red"]
    data = text_batches(texts, tokenizer, bert_inputs(), batch_size=8, seq_len=64, batch_tokens=10)
    shapes = [b["input_ids"].shape for b in data]
    assert shapes == [(1, 32), (2, 4)]  # the long row alone; the two short ones together
    with pytest.raises(CalibrationDataError, match="batch_tokens must be a positive integer"):
        text_batches(texts, tokenizer, bert_inputs(), batch_tokens=0)


def test_text_batches_truncation_and_int32(tokenizer: tokenizers.Tokenizer) -> None:
    data = text_batches(["the cat sat on the mat " * 10], tokenizer, bert_inputs(np.int32), seq_len=5)
    (batch,) = list(data)
    assert batch["input_ids"].tolist() == [[CLS, 4, 5, 6, SEP]]
    assert all(array.dtype == np.int32 for array in batch.values())


def test_text_batches_token_type_ids_only_when_model_has_it(tokenizer: tokenizers.Tokenizer) -> None:
    (batch,) = list(text_batches(["the cat"], tokenizer, bert_inputs(token_types=False)))
    assert set(batch) == {"input_ids", "attention_mask"}
    only_ids = [InputSpec("input_ids", np.dtype(np.int64), ("b", "s"))]
    (batch,) = list(text_batches(["the cat"], tokenizer, only_ids))
    assert set(batch) == {"input_ids"}


def test_text_batches_pad_id_from_tokenizer() -> None:
    tok = make_tokenizer(pad_token="<blank>")
    tok.enable_padding(pad_id=7, pad_token="[X]")
    (batch,) = list(text_batches(["the cat sat", "a"], tok, bert_inputs()))
    assert batch["input_ids"][1].tolist() == [CLS, 9, SEP, 7, 7]
    assert tok.padding is not None and tok.padding["pad_id"] == 7  # caller's tokenizer untouched
    no_pad = make_tokenizer(pad_token="<blank>")
    (batch,) = list(text_batches(["the cat sat", "a"], no_pad, bert_inputs()))
    assert batch["input_ids"][1].tolist() == [CLS, 9, SEP, 0, 0]
    assert no_pad.truncation is None and no_pad.padding is None


def test_text_batches_fixed_shapes(tokenizer: tokenizers.Tokenizer) -> None:
    inputs = [InputSpec(n, np.dtype(np.int64), (2, 6)) for n in ("input_ids", "attention_mask")]
    data = text_batches(["the cat", "a", "the cat sat on the mat again", "dog", "red"], tokenizer, inputs, batch_size=32)
    assert len(data) == 2 and data.num_samples == 4  # batch axis fixed to 2, remainder dropped
    for batch in data:
        assert batch["input_ids"].shape == (2, 6)


@pytest.mark.parametrize(
    "inputs,needle",
    [
        ([InputSpec("input_ids", np.dtype(np.int64), ("b", "s")), InputSpec("position_ids", np.dtype(np.int64), ("b", "s"))], "position_ids"),
        ([InputSpec("pixel_values", np.dtype(np.float32), ("b", 3, 8, 8))], "input_ids"),
        ([InputSpec("input_ids", np.dtype(np.float32), ("b", "s"))], "input_ids"),
        ([InputSpec("input_ids", np.dtype(np.int64), ("b", "s")), InputSpec("attention_mask", np.dtype(np.float32), ("b", "s"))], "attention_mask"),
        ([InputSpec("input_ids", np.dtype(np.int64), ("b",))], "rank"),
    ],
)
def test_text_batches_unfillable_inputs(tokenizer: tokenizers.Tokenizer, inputs: list[InputSpec], needle: str) -> None:
    with pytest.raises(CalibrationDataError) as excinfo:
        text_batches(["the cat"], tokenizer, inputs)
    one_line_error(excinfo, needle)


def test_text_batches_bad_arguments(tokenizer: tokenizers.Tokenizer) -> None:
    for kwargs in ({"batch_size": 0}, {"seq_len": 0}):
        with pytest.raises(CalibrationDataError) as excinfo:
            text_batches(["a"], tokenizer, bert_inputs(), **kwargs)
        one_line_error(excinfo, "positive")
    with pytest.raises(CalibrationDataError) as excinfo:
        text_batches([], tokenizer, bert_inputs())
    one_line_error(excinfo, "no samples")


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.one_of(
            st.lists(st.sampled_from(WORDS + ["zzz", "Cat", ",", "!"]), max_size=20).map(" ".join),
            st.text(max_size=30),
        ),
        min_size=1,
        max_size=12,
    ),
    batch_size=st.integers(1, 5),
    seq_len=st.integers(2, 16),
)
def test_text_batches_property(texts: list[str], batch_size: int, seq_len: int) -> None:
    tok = make_tokenizer()
    reference = make_tokenizer()
    reference.enable_truncation(seq_len)
    expected = [reference.encode(text).ids for text in texts]
    data = text_batches(texts, tok, bert_inputs(), batch_size=batch_size, seq_len=seq_len)
    assert data.num_samples == len(texts)
    assert len(data) == -(-len(texts) // batch_size)
    rows = 0
    for batch in data:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == batch["token_type_ids"].shape
        assert ids.shape[1] <= seq_len
        for r in range(ids.shape[0]):
            want = expected[rows + r]
            assert int(mask[r].sum()) == len(want)
            assert ids[r, : len(want)].tolist() == want
            assert (ids[r, len(want) :] == PAD).all()
        assert ids.shape[1] == max(1, max(len(expected[rows + r]) for r in range(ids.shape[0])))
        rows += ids.shape[0]
    assert rows == len(texts)
    assert tok.truncation is None


# --- load_calibration (text) ---------------------------------------------------------


def test_load_calibration_text_and_samples(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = write(tmp_path / "c.txt", "\n".join(["the cat", "a dog ran", "red mat", "big"]) + "\n")
    data = load_calibration(path, bert_inputs(), tokenizer=tokenizer_dir, batch_size=3)
    assert data.num_samples == 4 and len(data) == 2
    limited = load_calibration(path, bert_inputs(), tokenizer=tokenizer_dir, samples=2, batch_size=3)
    assert limited.num_samples == 2 and len(limited) == 1
    (batch,) = list(limited)
    assert batch["input_ids"].tolist() == [[CLS, 4, 5, SEP, PAD], [CLS, 9, 10, 11, SEP]]
    jsonl = write(tmp_path / "c.jsonl", '{"t": "the cat"}\n{"t": "big dog"}\n')
    data = load_calibration(jsonl, bert_inputs(), tokenizer=tokenizer_dir / "tokenizer.json", text_field="t")
    assert data.num_samples == 2


def test_load_calibration_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = write(tmp_path / "c.txt", "the cat\n")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(path, bert_inputs())
    one_line_error(excinfo, "text calibration data needs a tokenizer", str(path))
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(None, bert_inputs())
    one_line_error(excinfo, "needs a tokenizer")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(tmp_path / "missing.jsonl", bert_inputs(), tokenizer=tokenizer_dir)
    one_line_error(excinfo, "missing.jsonl", "does not exist")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(write(tmp_path / "c.parquet", "x"), bert_inputs(), tokenizer=tokenizer_dir)
    one_line_error(excinfo, "c.parquet", ".txt", ".jsonl", ".npz")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(None, bert_inputs(), tokenizer=tokenizer_dir, split="train")
    one_line_error(excinfo, "train")
    with pytest.raises(CalibrationDataError) as excinfo:
        load_calibration(path, bert_inputs(), tokenizer=tokenizer_dir, samples=0)
    one_line_error(excinfo, "samples")


def test_load_calibration_default_text(tokenizer_dir: Path) -> None:
    data = load_calibration(None, bert_inputs(), tokenizer=tokenizer_dir, samples=50, batch_size=16, seq_len=32)
    assert data.num_samples == 50 and len(data) == 4
    for batch in data:
        assert batch["input_ids"].shape[1] <= 32
    held = load_calibration(None, bert_inputs(), tokenizer=tokenizer_dir, samples=10, split="heldout")
    assert held.num_samples == 10


# --- npz ------------------------------------------------------------------------------


def npz_inputs() -> list[InputSpec]:
    return [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("pixel_values", np.dtype(np.float32), ("batch", 3, 4)),
    ]


def npz_arrays(n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 100, size=(n, 7), dtype=np.int32),
        "pixel_values": rng.standard_normal((n, 3, 4)).astype(np.float64),
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_batches(tmp_path: Path, compressed: bool) -> None:
    arrays = npz_arrays()
    path = tmp_path / "c.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    data = npz_batches(path, npz_inputs(), batch_size=4)
    assert len(data) == 3 and data.num_samples == 10
    batches = list(data)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["input_ids"].dtype == np.int64
    assert batches[0]["pixel_values"].dtype == np.float32
    assert all(isinstance(b["input_ids"], np.ndarray) and not isinstance(b["input_ids"], np.memmap) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), arrays["input_ids"])
    np.testing.assert_allclose(
        np.concatenate([b["pixel_values"] for b in batches]), arrays["pixel_values"].astype(np.float32)
    )
    limited = npz_batches(path, npz_inputs(), batch_size=4, samples=5)
    assert limited.num_samples == 5 and len(limited) == 2
    np.testing.assert_array_equal(list(limited)[1]["input_ids"], arrays["input_ids"][4:5])


def test_npz_uncompressed_is_memory_mapped(tmp_path: Path) -> None:
    from onnxq.calibration import data as data_module

    path = tmp_path / "c.npz"
    np.savez(path, **npz_arrays())
    arrays = data_module._load_npz(path)
    assert all(isinstance(array, np.memmap) for array in arrays.values())


def test_npz_via_load_calibration_bool_mask(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    mask = np.ones((3, 5), dtype=bool)
    np.savez(path, input_ids=np.ones((3, 5), np.int64), attention_mask=mask)
    data = load_calibration(path, bert_inputs(np.int32, token_types=False), samples=2)
    (batch,) = list(data)
    assert batch["attention_mask"].dtype == np.int32 and batch["attention_mask"].shape == (2, 5)


def save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_missing_input(tmp_path: Path) -> None:
    arrays = npz_arrays()
    path = save(tmp_path / "c.npz", input_ids=arrays["input_ids"])
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), "pixel_values")


def test_npz_extra_array(tmp_path: Path) -> None:
    path = save(tmp_path / "c.npz", **npz_arrays(), labels=np.zeros(10))
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), "labels")


@pytest.mark.parametrize(
    "name,value,dtypes",
    [
        ("input_ids", np.zeros((10, 7), np.float32), ("float32", "int64")),
        ("pixel_values", np.zeros((10, 3, 4), np.int64), ("int64", "float32")),
        ("pixel_values", np.zeros((10, 3, 4), np.complex64), ("complex64", "float32")),
    ],
)
def test_npz_dtype_not_castable(tmp_path: Path, name: str, value: np.ndarray, dtypes: tuple[str, str]) -> None:
    arrays = npz_arrays()
    arrays[name] = value
    path = save(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), name, *dtypes)


def test_npz_first_dims_differ(tmp_path: Path) -> None:
    arrays = npz_arrays()
    arrays["pixel_values"] = arrays["pixel_values"][:6]
    path = save(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), "sample counts", "input_ids=10", "pixel_values=6")


@pytest.mark.parametrize("shape,needle", [((10, 3, 5), "axis 2"), ((10, 12), "rank")])
def test_npz_fixed_dim_mismatch(tmp_path: Path, shape: tuple[int, ...], needle: str) -> None:
    arrays = npz_arrays()
    arrays["pixel_values"] = np.zeros(shape, np.float32)
    path = save(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), "pixel_values", needle)


def test_npz_fixed_batch_axis(tmp_path: Path) -> None:
    inputs = [InputSpec("x", np.dtype(np.float32), (4, 2))]
    path = save(tmp_path / "c.npz", x=np.zeros((10, 2), np.float32))
    data = npz_batches(path, inputs, batch_size=3)
    assert len(data) == 2 and data.num_samples == 8
    assert all(batch["x"].shape == (4, 2) for batch in data)
    small = save(tmp_path / "s.npz", x=np.zeros((3, 2), np.float32))
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(small, inputs)
    one_line_error(excinfo, str(small), "exactly 4")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_nan_inf(tmp_path: Path, bad: float) -> None:
    arrays = npz_arrays()
    arrays["pixel_values"][7, 1, 2] = bad
    path = save(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs())
    one_line_error(excinfo, str(path), "pixel_values", "NaN or Inf")
    # the bad row is outside the first 5 samples: fine when only those are used
    assert npz_batches(path, npz_inputs(), samples=5).num_samples == 5


def test_npz_int_out_of_range(tmp_path: Path) -> None:
    path = save(tmp_path / "c.npz", input_ids=np.full((2, 3), 2**40, np.int64))
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, [InputSpec("input_ids", np.dtype(np.int32), ("b", "s"))])
    one_line_error(excinfo, str(path), "input_ids", "int32")


def test_npz_unreadable_and_missing(tmp_path: Path) -> None:
    garbage = write(tmp_path / "g.npz", b"this is not a zip archive at all")
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(garbage, npz_inputs())
    one_line_error(excinfo, str(garbage), ".npz")
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(tmp_path / "missing.npz", npz_inputs())
    one_line_error(excinfo, "missing.npz", "does not exist")
    pickled = tmp_path / "p.npz"
    np.savez(pickled, input_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(pickled, npz_inputs()[:1])
    one_line_error(excinfo, str(pickled))


def test_npz_empty(tmp_path: Path) -> None:
    path = save(tmp_path / "c.npz", input_ids=np.zeros((0, 4), np.int64))
    with pytest.raises(CalibrationDataError) as excinfo:
        npz_batches(path, npz_inputs()[:1])
    one_line_error(excinfo, str(path), "no samples")


# --- input_specs ------------------------------------------------------------------------


def test_input_specs_from_onnx_ir_model() -> None:
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", 128]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([None, "seq"]))
    scale = ir.Value(name="scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]),
                     const_value=ir.tensor(np.ones(1, np.float32), name="scale"))
    graph = ir.Graph(inputs=[ids, mask, scale], outputs=[], nodes=[], initializers=[scale], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=9)
    specs = input_specs(model)
    assert specs == [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", 128)),
        InputSpec("attention_mask", np.dtype(np.int32), (None, "seq")),
    ]


# --- default text ---------------------------------------------------------------------


def test_default_text_sizes_and_disjoint() -> None:
    calib = default_text.calibration_texts()
    held = default_text.heldout_texts()
    assert len(calib) >= 1000
    assert len(held) >= 300
    assert not set(calib) & set(held)
    assert len(set(calib)) == len(calib) and len(set(held)) == len(held)
    assert default_text.calibration_texts(10) == calib[:10]
    assert default_text.heldout_texts(7) == held[:7]
    for sentence in calib[:200]:
        assert sentence[0].isupper() and sentence.endswith(".")
        assert 6 <= len(sentence.split()) <= 40
        assert "_" not in sentence and ">>>" not in sentence and "=" not in sentence
    templates = set(default_text.template_sentences(len(held), seed=20240611))
    from_templates = [s for s in held if s in templates]
    assert len(held) // 4 <= len(from_templates) <= len(held) // 2  # about one in three


def test_template_sentences_deterministic() -> None:
    a = default_text.template_sentences(200, seed=3)
    assert a == default_text.template_sentences(200, seed=3)
    assert a != default_text.template_sentences(200, seed=4)
    assert len(set(a)) == 200
    assert all(s[0].isupper() and s[-1] in ".?" for s in a)
    assert " a a" not in " ".join(a).lower().replace(" a an", "")


_HASH_SCRIPT = """
import hashlib, json
from onnxq.calibration import default_text as d
payload = json.dumps([d.calibration_texts(), d.heldout_texts()]).encode()
print(hashlib.sha256(payload).hexdigest())
"""


def test_default_text_deterministic_across_processes() -> None:
    digests = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=120)
        digests.append(out.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]
    here = hashlib.sha256(
        json.dumps([default_text.calibration_texts(), default_text.heldout_texts()]).encode()
    ).hexdigest()
    assert here == digests[0]
