"""The Python API: load, save, export, calibrate, quantize, convert.

``convert`` is the whole pipeline behind ``onnxq convert``::

    export (HF folder → ONNX) → canonicalize → outlier passes (FP32-equivalent)
    → calibrate (onnxruntime) → insert Q/DQ for the target → validate → save + report

Each step is also a function of its own, so export scripts can compose them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq import io as _io
from onnxq._progress import Progress
from onnxq.calibration import data as _data
from onnxq.calibration.runner import calibrate as _calibrate
from onnxq.calibration.runner import make_session
from onnxq.calibration.stats import Stats
from onnxq.errors import OnnxqError
from onnxq.eval.fidelity import Fidelity, collect_outputs, fidelity, first_output
from onnxq.recipe import Recipe
from onnxq.targets.profiles import get_target

if TYPE_CHECKING:
    from onnxq.passes.insert_qdq import QDQResult

__all__ = [
    "ConvertResult",
    "calibrate",
    "convert",
    "export",
    "load",
    "load_source",
    "prepare",
    "quantize",
    "save",
]

load = _io.load
save = _io.save


def export(
    source: str | os.PathLike | None = None, *, task: str = "auto", opset: int = 21
) -> ir.Model:
    """Export a Hugging Face model folder (or the default model) to an onnx-ir Model.

    Args:
        source: HF folder, installed package carrying one, or None for all-MiniLM-L6-v2.
        task: "auto", "feature-extraction", "text-classification" or "text-generation".
        opset: ai.onnx opset of the export.
    """
    from onnxq.exporters.dispatch import export_model

    return export_model(source, task=task, opset=opset).model


def _is_onnx_file(spec: str | os.PathLike | None) -> bool:
    return spec is not None and str(spec).lower().endswith(".onnx")


def load_source(
    source: str | os.PathLike | ir.Model | None, *, task: str = "auto", opset: int = 21
) -> tuple[ir.Model, pathlib.Path | None]:
    """Load an ONNX file or export a HF model; returns the model and its tokenizer folder."""
    if isinstance(source, ir.Model):
        tok = _preprocessing_dir(source)
        return source, pathlib.Path(tok) if tok else None
    if _is_onnx_file(source):
        model = _io.load(source)
        tok = _preprocessing_dir(model)
        folder = pathlib.Path(source).parent
        if (folder / "tokenizer.json").is_file():
            return model, folder
        return model, pathlib.Path(tok) if tok and pathlib.Path(tok).exists() else None
    from onnxq.exporters.dispatch import export_model

    result = export_model(source, task=task, opset=opset)
    return result.model, result.source


def _preprocessing_dir(model: ir.Model) -> str | None:
    """Folder with the tokenizer (text models) or image processor (vision models)."""
    meta = model.metadata_props
    return meta.get("onnxq.tokenizer") or meta.get("onnxq.image_processor")


def _is_image_model(model: ir.Model) -> bool:
    return any(v.name == "pixel_values" for v in model.graph.inputs)


def prepare(model: ir.Model) -> ir.Model:
    """Canonicalize ``model`` in place (constant folding, LayerNorm/GELU fusion, Gemm→MatMul)."""
    from onnxq.passes.canonicalize import CanonicalizePass

    CanonicalizePass()(model)
    return model


def calibrate(
    model: ir.Model,
    data: Any = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
    tensors: Sequence[str] | None = None,
    sample_rows: int = 0,
    progress: Progress | None = None,
    text_field: str = "text",
) -> Stats:
    """Calibrate ``model`` on ``data`` (a path, ``None`` for the default text, or feeds)."""
    recipe = recipe or Recipe()
    progress = progress or Progress(0)
    if data is None or isinstance(data, (str, os.PathLike)):
        data = _data.load_calibration(
            data,
            _data.input_specs(model),
            tokenizer=tokenizer,
            samples=recipe.samples,
            batch_size=recipe.batch_size,
            seq_len=recipe.seq_len,
            text_field=text_field,
            batch_tokens=recipe.batch_tokens,
        )
    total = getattr(data, "num_samples", None)
    with progress.bar("calibrating", total) as update:
        return _calibrate(model, data, tensors=tensors, sample_rows=sample_rows, progress=update)


def quantize(model: ir.Model, stats: Stats, *, recipe: Recipe | None = None) -> QDQResult:
    """Insert Q/DQ into ``model`` (in place) for ``recipe.target`` from ``stats``.

    Raises:
        StatsMismatchError: ``stats`` were computed on another graph.
    """
    from onnxq.passes.insert_qdq import InsertQDQPass

    from onnxq.calibration.stats import graph_fingerprint

    recipe = recipe or Recipe()
    stats.check_fingerprint(graph_fingerprint(model))
    result = InsertQDQPass(
        stats=stats,
        target=get_target(recipe.target),
        method=recipe.method,
        keep_fp=recipe.keep_fp,
        quantize_attention=recipe.quantize_attention,
        weight_bits=recipe.weight_bits,
        block_size=recipe.block_size,
    )(model)
    if recipe.int8_embeddings:
        from onnxq.passes.quantize_embeddings import QuantizeEmbeddingsPass

        result.embeddings = QuantizeEmbeddingsPass(bits=recipe.embedding_bits)(model).tables
    return result


@dataclasses.dataclass
class ConvertResult:
    """What :func:`convert` produced."""

    model: ir.Model
    output: pathlib.Path | None
    fidelity: Fidelity | None
    report: dict[str, Any]


def _split_data(
    model: ir.Model,
    calib: str | os.PathLike | None,
    tokenizer: pathlib.Path | None,
    recipe: Recipe,
    text_field: str = "text",
):
    """Calibration data and disjoint held-out validation data."""
    specs = _data.input_specs(model)
    if _is_image_model(model):
        from onnxq.calibration import images

        if calib is None:
            if tokenizer is None:
                raise OnnxqError("an image model needs its image processor folder "
                                 "(preprocessor_config.json); pass --tokenizer FOLDER")
            cal = images.default_image_batches(specs, processor_dir=tokenizer,
                                               samples=recipe.samples or 256,
                                               batch_size=recipe.batch_size, split="calib")
            val = None
            if recipe.validate_samples:
                val = images.default_image_batches(specs, processor_dir=tokenizer,
                                                   samples=recipe.validate_samples,
                                                   batch_size=recipe.batch_size,
                                                   split="heldout")
            return cal, val
        return images.split_image_calibration(
            calib, specs, processor_dir=tokenizer, samples=recipe.samples,
            validate_samples=recipe.validate_samples, batch_size=recipe.batch_size)
    if calib is None:
        cal = _data.load_calibration(
            None, specs, tokenizer=tokenizer, samples=recipe.samples,
            batch_size=recipe.batch_size, seq_len=recipe.seq_len, split="calib",
            batch_tokens=recipe.batch_tokens,
        )
        val = None
        if recipe.validate_samples:
            val = _data.load_calibration(
                None, specs, tokenizer=tokenizer, samples=recipe.validate_samples,
                batch_size=recipe.batch_size, seq_len=recipe.seq_len, split="heldout",
                batch_tokens=recipe.batch_tokens,
            )
        return cal, val
    return _data.split_calibration(
        calib, specs, tokenizer=tokenizer, samples=recipe.samples,
        validate_samples=recipe.validate_samples, batch_size=recipe.batch_size,
        seq_len=recipe.seq_len, text_field=text_field, batch_tokens=recipe.batch_tokens,
    )


def convert(
    source: str | os.PathLike | ir.Model | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    calib: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    stats: Stats | None = None,
    progress: Progress | None = None,
    task: str = "auto",
    text_field: str = "text",
    min_cosine: float | None = None,
) -> ConvertResult:
    """Convert a model to a static INT8 QDQ graph; see the module docstring for the steps.

    Args:
        source: ONNX file, HF folder / package name, an onnx-ir Model, or None for the
            default model (all-MiniLM-L6-v2).
        output: where to write the INT8 model (and ``.report.json`` / ``.report.md``).
            ``None`` keeps everything in memory.
        recipe: what to do; defaults to :class:`~onnxq.recipe.Recipe()`.
        calib: calibration data file (.txt, .jsonl, .npz); None = embedded default text.
        tokenizer: folder or tokenizer.json for text calibration of ONNX inputs.
        stats: precomputed statistics (from ``onnxq calibrate``) to skip calibration.
        progress: stage timing / progress display.
        task: export task when ``source`` is a Hugging Face model.
        text_field: field holding the text in ``.jsonl`` calibration files.
        min_cosine: accuracy-driven fallback: while the held-out mean cosine is below
            this, move the quantized layer with the worst quantization SQNR to floating
            point (greedily, one layer at a time) and re-validate.
    """
    recipe = recipe or Recipe()
    progress = progress or Progress(0)
    target = get_target(recipe.target)
    with progress.stage("load/export"):
        model, tok_dir = load_source(source, task=task, opset=recipe.opset)
    tok = pathlib.Path(tokenizer) if tokenizer else tok_dir
    src_name = (str(source) if source is not None and not isinstance(source, ir.Model)
                else "all-MiniLM-L6-v2 (default)" if source is None else "in-memory model")
    from onnxq.ssm import convert_mamba, is_mamba_step

    if is_mamba_step(model):
        return convert_mamba(model, output, recipe=recipe, calib=calib, tokenizer=tok,
                             progress=progress, source=src_name)
    from onnxq.llm import convert_decoder, is_decoder

    if is_decoder(model):
        if stats is not None or min_cosine is not None:
            raise OnnxqError("--stats and --min-cosine are not supported for text-generation "
                             "decoders yet")
        return convert_decoder(model, output, recipe=recipe, calib=calib, tokenizer=tok,
                               progress=progress, text_field=text_field, source=src_name)
    with progress.stage("canonicalize"):
        prepare(model)
    from onnxq.support import check_supported

    check_supported(model)
    # A model above the external-data threshold keeps its weights memory-mapped and is
    # written with external data, even when its INT8 form would fit in one file.
    big = _io.total_initializer_bytes(model) > _io.EXTERNAL_DATA_THRESHOLD
    with contextlib.ExitStack() as refs:
        return _convert_prepared(
            model, output, refs=refs, big=big, recipe=recipe, calib=calib, tok=tok,
            stats=stats, progress=progress, text_field=text_field, min_cosine=min_cosine,
            target=target, source=source,
        )


def _convert_prepared(model, output, *, refs, big, recipe, calib, tok, stats, progress,
                      text_field, min_cosine, target, source):
    from onnxq.eval.report import build_report, write_reports
    from onnxq.pipeline import apply_outlier_passes

    fp32_bytes = _snapshot(model, refs, "fp32")
    cal_data, val_data = _split_data(model, calib, tok, recipe, text_field)

    with progress.stage("outlier passes"):
        outlier_report = apply_outlier_passes(model, cal_data, recipe, progress=progress)
    if stats is None:
        with progress.stage("calibrate"):
            stats = calibrate(model, cal_data, recipe=recipe, progress=progress)
    prequant = None
    if min_cosine is not None:
        prequant = _snapshot(model, refs, "prequant")
    with progress.stage("quantize"):
        qres = quantize(model, stats, recipe=recipe)
    fid = None
    fallback = None
    if val_data is not None:
        with progress.stage("validate"):
            fid = validate(fp32_bytes, model, val_data, progress=progress,
                           kernels=_validate_with_kernels(target))
        if min_cosine is not None and fid.mean_cosine < min_cosine:
            with progress.stage("fallback"):
                model, qres, fid, fallback = _fallback(
                    prequant, fp32_bytes, stats, recipe, val_data, fid, min_cosine, qres
                )
    report = build_report(
        model=model, recipe=recipe, target=target, qdq=qres, fidelity=fid,
        outliers=outlier_report, timings=progress.timings, stats=stats,
        source=str(source) if source is not None and not isinstance(source, ir.Model) else
        "all-MiniLM-L6-v2 (default)" if source is None else "in-memory model",
    )
    if fallback is not None:
        report["fallback"] = fallback
    out_path = None
    if output is not None:
        out_path = pathlib.Path(output)
        with progress.stage("save"):
            _io.save(model, out_path, external_data=True if big else None)
            report["output"] = _io_sizes(out_path)
            write_reports(report, out_path)
            from onnxq.eval.html import write_html_report

            write_html_report(
                report, out_path.with_name(out_path.name.removesuffix(".onnx") + ".report.html"),
                stats_after=stats,
            )
    return ConvertResult(model=model, output=out_path, fidelity=fid, report=report)


# At most this many layers are moved to floating point by the fallback.
MAX_FALLBACK_STEPS = 24


def _fallback(prequant, fp32_bytes, stats, recipe, val_data, fid, target, qres):
    """Greedy accuracy-driven fallback (see :func:`convert`'s ``min_cosine``).

    The candidate order comes from :func:`onnxq.eval.compare.compare` on a part of the
    validation data: quantized activations sorted by the SQNR of their own Q/DQ pair
    (worst first). Each step re-quantizes the pre-Q/DQ graph with the same statistics
    and one more layer kept in floating point, and validates again.
    """
    from onnxq.eval.bench import bench
    from onnxq.eval.compare import compare

    def fresh() -> ir.Model:
        return _restore(prequant)

    fp32_model = _restore(fp32_bytes)
    first = _quantized_copy(fresh(), stats, recipe)
    subset = [b for _, b in zip(range(2), val_data)]
    errors = compare(fp32_model, first, subset)
    candidates: list[str] = []
    acts = [e for e in errors if e.role == "activation" and e.module]
    acts.sort(key=lambda e: (e.local_sqnr_db if e.local_sqnr_db is not None else 1e9, e.index))
    for e in acts:
        if e.module not in candidates and e.module not in recipe.keep_fp:
            candidates.append(e.module)
    steps = [{"kept_fp": None, "mean_cosine": fid.mean_cosine}]
    keep = list(recipe.keep_fp)
    model = first
    for module in candidates[:MAX_FALLBACK_STEPS]:
        keep.append(module)
        model = fresh()
        qres = quantize(model, stats, recipe=recipe.replace(keep_fp=tuple(keep)))
        fid = validate(fp32_bytes, model, val_data,
                       kernels=_validate_with_kernels(get_target(recipe.target)))
        steps.append({"kept_fp": module, "mean_cosine": fid.mean_cosine})
        if fid.mean_cosine >= target:
            break
    reached = fid.mean_cosine >= target
    # speed cost: the fallback graph against the fully quantized one, interleaved
    speed = None
    with contextlib.suppress(Exception):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxq-fallback-") as tmp:
            a, b = pathlib.Path(tmp) / "all.onnx", pathlib.Path(tmp) / "fallback.onnx"
            _io.save(first, a)
            _io.save(_quantized_copy(fresh(), stats, recipe.replace(keep_fp=tuple(keep))), b)
            res = bench([str(a), str(b)], batch=8, seq_len=128, warmup=1, repeat=3)
            speed = res[1].speedup
    info = {"target_cosine": target, "reached": reached, "kept_fp": keep[len(recipe.keep_fp):],
            "steps": steps, "speed_vs_fully_quantized": speed}
    return model, qres, fid, info


def _validate_with_kernels(target) -> bool:
    """ort-cpu graphs are judged on onnxruntime's integer kernels; TensorRT/Jetson graphs
    on exact Q/DQ arithmetic (see :func:`validate`)."""
    return target.name == "ort-cpu"


def _quantized_copy(model: ir.Model, stats: Stats, recipe: Recipe) -> ir.Model:
    quantize(model, stats, recipe=recipe)
    return model


def _materialized(model: ir.Model) -> ir.Model:
    ir.external_data.load_to_model(model)
    return model


# Reference copies of a model (the FP32 graph for validation, the pre-Q/DQ graph for the
# fallback) above this many bytes of weights go to a temporary folder with external data:
# a protobuf message cannot exceed 2 GB, and the weights stay memory-mapped.
_SNAPSHOT_INLINE_LIMIT = 1_500_000_000


def _snapshot(model: ir.Model, refs: contextlib.ExitStack, name: str) -> bytes | str:
    """Serialized ``model`` (bytes), or the path of a temporary copy for large models."""
    if _io.total_initializer_bytes(model) <= _SNAPSHOT_INLINE_LIMIT:
        return ir.serde.serialize_model(_materialized(model)).SerializeToString()
    import tempfile

    folder = refs.enter_context(tempfile.TemporaryDirectory(prefix="onnxq-ref-"))
    path = os.path.join(folder, f"{name}.onnx")
    ir.save(model, path, external_data=f"{name}.onnx.data")
    return path


def _restore(snapshot: bytes | str) -> ir.Model:
    if isinstance(snapshot, bytes):
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(snapshot))
    return _io.load(snapshot)


def _io_sizes(path: pathlib.Path) -> dict[str, Any]:
    data = path.parent / f"{path.name}.data"
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return {"path": str(path), "bytes": size}


def validate(
    fp32: bytes | str | os.PathLike | ir.Model,
    model: ir.Model,
    data: Any,
    *,
    progress: Progress | None = None,
    kernels: bool = True,
) -> Fidelity:
    """Fidelity of ``model`` against the FP32 graph on ``data`` (onnxruntime CPU).

    Args:
        fp32: the FP32 reference: serialized bytes, an ``.onnx`` path, or an onnx-ir Model.
        model: the (quantized) model to check.
        data: iterable of feed dicts.
        progress: unused; accepted for symmetry with the other steps.
        kernels: run the quantized model with onnxruntime's graph optimisations, i.e. its
            fused integer CPU kernels (what ``ort-cpu`` deploys). False evaluates the exact
            Q/DQ arithmetic (optimisations off), which is what TensorRT's INT8 GEMMs with
            int32 accumulation compute; the x86 u8s8 kernels of a CPU without VNNI can
            saturate 16-bit intermediates and would misstate a TensorRT graph's accuracy.

    Raises:
        OnnxqError: the quantized model produced NaN or Inf.
    """
    if isinstance(fp32, ir.Model):
        with make_session(fp32, optimize=True) as ref_sess:
            return _validate_with(ref_sess, model, data, kernels)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(fp32, os.PathLike):
        fp32 = os.fspath(fp32)
    ref_sess = ort.InferenceSession(fp32, opts, providers=["CPUExecutionProvider"])
    return _validate_with(ref_sess, model, data, kernels)


def _validate_with(ref_sess, model: ir.Model, data: Any, kernels: bool = True) -> Fidelity:
    names = [o.name for o in ref_sess.get_outputs()]
    out = first_output(names)
    batches = list(data)
    ref, _ = collect_outputs(ref_sess, batches, out)
    del ref_sess
    with make_session(model, optimize=kernels) as sess:
        test, _ = collect_outputs(sess, batches, out)
    if not np.all(np.isfinite(test)):
        raise OnnxqError("the quantized model produced NaN or Inf on the validation data")
    return fidelity(ref, test, output=out)
