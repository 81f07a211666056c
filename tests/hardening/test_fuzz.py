"""Fuzzing the loaders, passes and CLI: every failure is a documented, clear error.

Property: whatever the input (random bytes, truncated or bit-flipped models and
statistics files, random calibration files and recipes, random small graphs), onnxq
either succeeds or raises an :class:`onnxq.errors.OnnxqError` subclass (the CLI: exit
code 2 with one ``onnxq: error:`` line), never another exception, a traceback or a
partial output file. Hypothesis runs derandomized (the same cases every run) with a
fixed number of examples; the number of cases run is printed at the end of the session
(``onnxq fuzz summary``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxq
from onnxq.calibration import data as cdata
from onnxq.calibration.stats import Stats
from onnxq.errors import CalibrationDataError, OnnxqError, StatsMismatchError
from onnxq.testing import encoder_block_model

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


def fuzz(n: int):
    return settings(FUZZ, max_examples=n)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def model_bytes(work) -> bytes:
    path = work / "block.onnx"
    ir.save(encoder_block_model(), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def external_model(work) -> tuple[bytes, bytes]:
    folder = work / "ext"
    folder.mkdir()
    ir.save(encoder_block_model(), folder / "m.onnx", external_data="m.onnx.data",
            size_threshold_bytes=0)
    return (folder / "m.onnx").read_bytes(), (folder / "m.onnx.data").read_bytes()


@pytest.fixture(scope="module")
def calib_npz(work) -> pathlib.Path:
    path = work / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((60, 6, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def stats_file(work, calib_npz) -> tuple[pathlib.Path, Stats]:
    model = encoder_block_model()
    onnxq.prepare(model)
    stats = onnxq.calibrate(model, calib_npz, recipe=onnxq.Recipe(samples=20, batch_size=8))
    path = work / "stats.npz"
    stats.save(path)
    return path, Stats.load(path)


@pytest.fixture(scope="module")
def tokenizer_dir(work) -> pathlib.Path:
    from onnxq.zoo.bert import _vocabulary, _write_tokenizer

    folder = work / "tok"
    folder.mkdir()
    _write_tokenizer(folder, _vocabulary(200))
    return folder


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, bit in flips:
        buf[pos % len(buf)] ^= 1 << bit
    return bytes(buf)


flips_st = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 7)), min_size=1,
                    max_size=8)


# ------------------------------------------------------- (a) model loading
def _try_load(path, counter, name="load"):
    try:
        model = onnxq.load(path)
    except OnnxqError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        counter[(name, "refused")] += 1
        return None
    counter[(name, "loaded")] += 1
    return model


@fuzz(150)
@given(data=st.binary(max_size=3000))
def test_load_random_bytes(work, data, fuzz_counter):
    path = work / "random.onnx"
    path.write_bytes(data)
    _try_load(path, fuzz_counter)


@fuzz(120)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_load_truncated(work, model_bytes, cut, fuzz_counter):
    path = work / "truncated.onnx"
    path.write_bytes(model_bytes[: int(cut * len(model_bytes))])
    _try_load(path, fuzz_counter)


@fuzz(400)
@given(flips=flips_st)
def test_load_bit_flipped(work, model_bytes, flips, fuzz_counter):
    path = work / "flipped.onnx"
    path.write_bytes(_mutate(model_bytes, flips))
    model = _try_load(path, fuzz_counter)
    if model is not None:  # what loads must also be hashable and checkable
        from onnxq.calibration.stats import graph_fingerprint
        from onnxq.support import unsupported_nodes

        with contextlib.suppress(OnnxqError):
            graph_fingerprint(model)
            unsupported_nodes(model)


@fuzz(120)
@given(flips=flips_st, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_load_external_data_mutations(work, external_model, flips, cut, fuzz_counter):
    """Bit flips in a model with external data (locations, offsets, lengths), short data."""
    graph, data = external_model
    folder = work / "extm"
    folder.mkdir(exist_ok=True)
    (folder / "m.onnx").write_bytes(_mutate(graph, flips))
    (folder / "m.onnx.data").write_bytes(data if cut is None else data[: int(cut * len(data))])
    model = _try_load(folder / "m.onnx", fuzz_counter, "load-external")
    if model is not None:
        try:
            ir.external_data.load_to_model(model)
        except Exception:  # noqa: BLE001 - load checked sizes; reading must not be needed
            pytest.fail("a model that load() accepted has unreadable external data")


def test_load_special_paths(work, external_model, fuzz_counter):
    cases = {}
    empty = work / "empty.onnx"
    empty.write_bytes(b"")
    cases["empty"] = empty
    cases["directory"] = work
    cases["missing"] = work / "nope.onnx"
    folder = work / "noext"
    folder.mkdir(exist_ok=True)
    (folder / "m.onnx").write_bytes(external_model[0])
    cases["missing external data"] = folder / "m.onnx"
    short = work / "short"
    short.mkdir(exist_ok=True)
    (short / "m.onnx").write_bytes(external_model[0])
    (short / "m.onnx.data").write_bytes(external_model[1][:100])
    cases["truncated external data"] = short / "m.onnx"
    for what, path in cases.items():
        with pytest.raises(OnnxqError):
            onnxq.load(path)
        fuzz_counter[("load-special", what)] += 1


# ------------------------------------------------------- (b) the CLI
def _cli_inprocess(args: list[str]) -> tuple[int, str, str]:
    from onnxq.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _check_cli(cmd: str, code: int, stdout: str, stderr: str, out: pathlib.Path | None):
    assert "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr
    if cmd == "lint" and code == 1:  # lint's documented "violations found"
        assert "violation" in stdout, stdout
        return "violations"
    assert code in (0, 2), (code, stderr)
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), stderr
        if out is not None:
            assert not out.exists(), "output left behind after an error"
            leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert not leftovers, leftovers
        return "error"
    return "ok"


@fuzz(100)
@given(flips=flips_st, cmd=st.sampled_from(["convert", "lint", "quantize"]))
def test_cli_inprocess_on_mutated_models(work, model_bytes, calib_npz, stats_file, flips, cmd,
                                         fuzz_counter):
    folder = work / "cli"
    folder.mkdir(exist_ok=True)
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()
    src = folder / "m.onnx"
    src.write_bytes(_mutate(model_bytes, flips))
    out = folder / "out.onnx"
    if cmd == "convert":
        args = ["convert", str(src), "-o", str(out), "--calib", str(calib_npz), "-q",
                "--samples", "16", "--batch-size", "8"]
    elif cmd == "quantize":
        args = ["quantize", str(src), "-o", str(out), "--stats", str(stats_file[0]), "-q"]
    else:
        args, out = ["lint", str(src)], None
    code, stdout, stderr = _cli_inprocess(args)
    fuzz_counter[(f"cli-inprocess {cmd}", _check_cli(cmd, code, stdout, stderr, out))] += 1


def test_cli_subprocess_on_mutated_files(work, model_bytes, calib_npz, stats_file, fuzz_counter):
    """A handful of bad files through ``python -m onnxq`` itself."""
    rng = np.random.default_rng(7)
    folder = work / "sub"
    folder.mkdir(exist_ok=True)
    files = {
        "truncated": model_bytes[: len(model_bytes) // 2],
        "random": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "flipped": _mutate(model_bytes, [(int(p), 3) for p in rng.integers(0, 10**6, 4)]),
        "zeros": bytes(len(model_bytes)),
    }
    bad_stats = folder / "stats.npz"
    raw = stats_file[0].read_bytes()
    bad_stats.write_bytes(raw[: len(raw) - 200])
    runs = []
    for name, data in files.items():
        src = folder / f"{name}.onnx"
        src.write_bytes(data)
        out = folder / f"{name}.out.onnx"
        runs.append(("convert", ["convert", str(src), "-o", str(out), "--calib", str(calib_npz),
                                 "--samples", "16"], out))
        runs.append(("lint", ["lint", str(src)], None))
    good = folder / "good.onnx"
    good.write_bytes(model_bytes)
    out = folder / "q.out.onnx"
    runs.append(("quantize", ["quantize", str(good), "-o", str(out), "--stats", str(bad_stats)],
                 out))
    for cmd, args, out in runs:
        proc = subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True,
                              text=True, timeout=300)
        outcome = _check_cli(cmd, proc.returncode, proc.stdout, proc.stderr, out)
        fuzz_counter[(f"cli-subprocess {cmd}", outcome)] += 1


# ------------------------------------------------------- (c) statistics files
def _same_stats(a: Stats, b: Stats) -> bool:
    if a.fingerprint != b.fingerprint or a.meta != b.meta or a.names() != b.names():
        return False
    for name in a:
        x, y = a[name].to_arrays(), b[name].to_arrays()
        if x.keys() != y.keys():
            return False
        for k in x:
            if x[k].dtype != y[k].dtype or not np.array_equal(x[k], y[k], equal_nan=True):
                return False
    return True


def _try_stats(path, original, counter, name, must_equal=True):
    try:
        loaded = Stats.load(path)
    except CalibrationDataError as exc:
        assert "\n" not in str(exc), repr(exc)
        counter[(name, "refused")] += 1
        return
    if must_equal:
        assert _same_stats(loaded, original), "a corrupted stats file loaded as different data"
    counter[(name, "loaded")] += 1


@fuzz(200)
@given(flips=flips_st)
def test_stats_bit_flipped(work, stats_file, flips, fuzz_counter):
    path, original = stats_file
    bad = work / "flipped-stats.npz"
    bad.write_bytes(_mutate(path.read_bytes(), flips))
    _try_stats(bad, original, fuzz_counter, "stats bit-flip")


@fuzz(80)
@given(cut=st.floats(0, 1, exclude_max=True), junk=st.binary(max_size=64))
def test_stats_truncated_or_random(work, stats_file, cut, junk, fuzz_counter):
    path, original = stats_file
    raw = path.read_bytes()
    bad = work / "cut-stats.npz"
    bad.write_bytes(raw[: int(cut * len(raw))] + junk)
    _try_stats(bad, original, fuzz_counter, "stats truncated")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                      children, max_size=3),
    max_leaves=8,
)


@fuzz(120)
@given(
    field=st.sampled_from(["format", "version", "fingerprint", "names", "meta", None]),
    value=json_values,
    drop=st.one_of(st.none(), st.integers(0, 50)),
    reshape=st.one_of(st.none(), st.integers(0, 50)),
)
def test_stats_structured_mutations(work, stats_file, field, value, drop, reshape, fuzz_counter):
    """Valid archives with a wrong header field, a missing member or a reshaped array."""
    path, _ = stats_file
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(str(arrays["header"]))
    if field is not None:
        header[field] = value
    arrays["header"] = np.asarray(json.dumps(header))
    members = sorted(k for k in arrays if k != "header")
    if drop is not None:
        arrays.pop(members[drop % len(members)])
    if reshape is not None:
        key = members[reshape % len(members)]
        if key in arrays:
            arrays[key] = np.asarray(arrays[key]).reshape(-1)[:3].astype(np.float16)
    bad = work / "structured-stats.npz"
    np.savez(bad, **arrays)
    _try_stats(bad, None, fuzz_counter, "stats structured", must_equal=False)


def test_mismatched_stats_are_refused(stats_file, fuzz_counter):
    _, stats = stats_file
    other = encoder_block_model(seed=3)
    onnxq.prepare(other)
    with pytest.raises(StatsMismatchError, match="different graph"):
        onnxq.quantize(other, stats)
    fuzz_counter[("stats mismatch", "refused")] += 1


# ------------------------------------------------------- (d) passes on random graphs
@fuzz(40)
@given(
    hidden=st.sampled_from([8, 12, 16, 24, 32]),
    ffn=st.sampled_from([8, 16, 20, 48, 64]),
    seed=st.integers(0, 1000),
    outlier=st.one_of(st.none(), st.integers(0, 7)),
    post_ln=st.booleans(),
    rms=st.booleans(),
    bias=st.booleans(),
    outliers=st.sampled_from(["auto", "none", "osplus", "osplus-shift", "smoothquant",
                              "ffn-scaling", "peg", "osplus,ffn-scaling", "smoothquant,peg"]),
    target=st.sampled_from(["tensorrt", "ort-cpu", "jetson"]),
    method=st.sampled_from(["minmax", "percentile", "entropy", "mse"]),
    scale=st.sampled_from([1.0, 30.0, 1e-3]),
)
def test_passes_on_random_graphs(hidden, ffn, seed, outlier, post_ln, rms, bias, outliers,
                                 target, method, scale, fuzz_counter):
    from onnxq.pipeline import apply_outlier_passes
    from onnxq.targets.lint import lint
    from onnxq.targets.profiles import get_target
    from onnxq.testing import run

    model = encoder_block_model(hidden=hidden, ffn=ffn, seed=seed, outlier_channel=outlier,
                                post_ln=post_ln, rms=rms, bias=bias)
    rng = np.random.default_rng(seed)
    batches = [{"x": (scale * rng.standard_normal((4, 5, hidden))).astype(np.float32)}
               for _ in range(4)]
    if outlier is not None:
        for b in batches:
            b["x"][..., outlier] *= 20
    recipe = onnxq.Recipe(target=target, method=method, outliers=tuple(outliers.split(",")))
    try:
        onnxq.prepare(model)
        (ref,) = run(model, batches[0])
        apply_outlier_passes(model, batches, recipe)
        (after,) = run(model, batches[0])
        # the outlier passes are FP32-equivalent rewrites
        np.testing.assert_allclose(after, ref, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(ref).max()))
        stats = onnxq.calibrate(model, batches, recipe=recipe)
        onnxq.quantize(model, stats, recipe=recipe)
    except OnnxqError as exc:
        assert "\n" not in str(exc)
        fuzz_counter[("passes", "refused")] += 1
        return
    (out,) = run(model, batches[0])
    assert out.shape == ref.shape and np.isfinite(out).all()
    lint(model, get_target(target))
    fuzz_counter[("passes", "converted")] += 1


# ------------------------------------------------------- (e) calibration readers
TEXT_SPECS = [cdata.InputSpec("input_ids", np.int64, ("batch", "seq")),
              cdata.InputSpec("attention_mask", np.int64, ("batch", "seq"))]
ARRAY_SPECS = [cdata.InputSpec("x", np.float32, ("batch", 6, 16))]


def _try_reader(path, specs, counter, name, tokenizer=None, **kw):
    try:
        data = cdata.load_calibration(path, specs, tokenizer=tokenizer, batch_size=4,
                                      seq_len=16, **kw)
        n = 0
        for batch in data:
            for spec in specs:
                assert batch[spec.name].dtype == spec.dtype
            n += next(iter(batch.values())).shape[0]
        assert n == data.num_samples
        cal, val = cdata.split_calibration(path, specs, tokenizer=tokenizer, batch_size=4,
                                           seq_len=16, validate_samples=8, **kw)
        for part in (cal, val):
            for _ in part or ():
                pass
    except CalibrationDataError as exc:
        assert "\n" not in str(exc), repr(exc)
        counter[(name, "refused")] += 1
        return
    counter[(name, "read")] += 1


@fuzz(80)
@given(text=st.text(max_size=400), ext=st.sampled_from([".txt", ".jsonl"]),
       field=st.sampled_from(["text", "t"]))
def test_text_readers_on_random_text(work, tokenizer_dir, text, ext, field, fuzz_counter):
    path = work / f"random{ext}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _try_reader(path, TEXT_SPECS, fuzz_counter, f"reader {ext}", tokenizer_dir, text_field=field)


@fuzz(60)
@given(records=st.lists(json_values | st.fixed_dictionaries(
    {"text": st.text(max_size=60)}, optional={"label": json_values}), max_size=6))
def test_jsonl_reader_on_random_records(work, tokenizer_dir, records, fuzz_counter):
    path = work / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    _try_reader(path, TEXT_SPECS, fuzz_counter, "reader .jsonl records", tokenizer_dir)


@fuzz(60)
@given(data=st.binary(max_size=600), ext=st.sampled_from([".txt", ".jsonl", ".npz"]))
def test_readers_on_random_bytes(work, tokenizer_dir, data, ext, fuzz_counter):
    path = work / f"bytes{ext}"
    path.write_bytes(data)
    specs = ARRAY_SPECS if ext == ".npz" else TEXT_SPECS
    _try_reader(path, specs, fuzz_counter, f"reader bytes {ext}", tokenizer_dir)


@fuzz(100)
@given(flips=flips_st, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_npz_reader_on_mutated_archives(work, calib_npz, flips, cut, fuzz_counter):
    raw = _mutate(calib_npz.read_bytes(), flips)
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = work / "mutated.npz"
    path.write_bytes(raw)
    _try_reader(path, ARRAY_SPECS, fuzz_counter, "reader .npz mutated")


dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8,
                          np.bool_, np.complex64])


@fuzz(80)
@given(
    arrays=st.dictionaries(
        st.sampled_from(["x", "y", "input_ids", "attention_mask"]),
        st.tuples(dtypes, st.lists(st.integers(0, 7), max_size=4), st.booleans()),
        max_size=3),
    compressed=st.booleans(), special=st.sampled_from([None, "nan", "inf", "big"]),
)
def test_npz_reader_on_random_arrays(work, arrays, compressed, special, fuzz_counter):
    rng = np.random.default_rng(0)
    content = {}
    for name, (dtype, shape, _) in arrays.items():
        arr = (rng.standard_normal(shape) * 100).astype(dtype)
        if special and arr.size and arr.dtype.kind == "f":
            arr.flat[0] = {"nan": np.nan, "inf": np.inf, "big": 1e30}[special]
        if special == "big" and arr.size and arr.dtype.kind in "iu":
            arr.flat[0] = np.iinfo(arr.dtype).max
        content[name] = arr
    path = work / "arrays.npz"
    (np.savez_compressed if compressed else np.savez)(path, **content)
    _try_reader(path, ARRAY_SPECS, fuzz_counter, "reader .npz arrays")
    _try_reader(path, [cdata.InputSpec("input_ids", np.int64, ("batch", "seq"))], fuzz_counter,
                "reader .npz arrays")


def test_npz_with_pickled_member_is_refused(work, fuzz_counter):
    path = work / "pickled.npz"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        zf.writestr("x.npy", buf.getvalue())
    with pytest.raises(CalibrationDataError):
        list(cdata.npz_batches(path, ARRAY_SPECS))
    fuzz_counter[("reader .npz pickle", "refused")] += 1


# ------------------------------------------------------- (f) recipes
toml_scalars = (st.integers(-(2**63), 2**63 - 1) | st.booleans() | st.text(max_size=10)
                | st.floats(allow_nan=False, allow_infinity=False))
toml_values = st.one_of(toml_scalars, st.lists(st.text(max_size=10), max_size=3),
                        st.lists(st.integers(-5, 5), max_size=3))
recipe_keys = st.sampled_from(["target", "method", "samples", "batch_size", "seq_len", "batch_tokens",
                               "keep_fp", "quantize_attention", "outliers", "validate_samples",
                               "opset", "int8_embeddings", "weight_bits", "block_size",
                               "unknown", "Target"])
good_values = {
    "target": st.sampled_from(["tensorrt", "ort-cpu", "jetson", "tpu"]),
    "method": st.sampled_from(["minmax", "percentile", "entropy", "mse", "magic"]),
    "outliers": st.lists(st.sampled_from(["auto", "none", "osplus", "peg", "bogus"]), max_size=3),
}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON strings are TOML basic strings (\uXXXX escapes)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


@fuzz(150)
@given(entries=st.dictionaries(
    recipe_keys, toml_values, max_size=6), nice=st.dictionaries(
    st.sampled_from(sorted(good_values)), st.just(None), max_size=3), data=st.data())
def test_recipe_from_random_toml(work, entries, nice, data, fuzz_counter):
    for key in nice:
        entries[key] = data.draw(good_values[key])
    text = "".join(f"{k} = {_toml(v)}\n" for k, v in entries.items())
    _try_recipe(work, text.encode("utf-8", "surrogatepass"), fuzz_counter, "recipe random")


@fuzz(60)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(
    lambda t: t.encode("utf-8", "surrogatepass")))
def test_recipe_from_random_bytes(work, raw, fuzz_counter):
    _try_recipe(work, raw, fuzz_counter, "recipe bytes")


def _try_recipe(work, raw: bytes, counter, name):
    path = work / "recipe.toml"
    path.write_bytes(raw)
    try:
        recipe = onnxq.load_recipe(path)
    except OnnxqError as exc:
        assert "\n" not in str(exc), repr(exc)
        counter[(name, "refused")] += 1
        return
    assert isinstance(recipe, onnxq.Recipe)
    assert recipe.batch_size > 0 and recipe.seq_len > 0 and recipe.block_size > 0
    assert recipe.batch_tokens > 0
    assert recipe.opset > 0
    counter[(name, "valid")] += 1


def test_recipe_special_paths(work, fuzz_counter):
    for path in (work / "missing.toml", work):
        with pytest.raises(OnnxqError):
            onnxq.load_recipe(path)
        fuzz_counter[("recipe special", "refused")] += 1


def test_recipe_cli_errors_are_one_line(work, fuzz_counter):
    bad = work / "bad.toml"
    bad.write_text('target = "tensorrt"\nsamples = "many"\n')
    block = work / "block-r.onnx"
    ir.save(encoder_block_model(), block)
    for recipe in (bad, work):
        code, _, stderr = _cli_inprocess(["convert", str(block), "-o", str(work / "r.onnx"),
                                          "--recipe", str(recipe)])
        assert code == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), stderr
        fuzz_counter[("recipe cli", "refused")] += 1
    assert not os.path.exists(work / "r.onnx")
