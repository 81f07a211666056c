"""``onnxq convert`` for Mamba state-space models (the Quamba recipe).

The Mamba graph onnxq exports is one decode step with explicit ``conv_state.{i}`` /
``ssm_state.{i}`` inputs and ``*_out`` outputs (see :mod:`onnxq.exporters.mamba`).
Converting it:

1. canonicalize;
2. Quamba's online Hadamard on the SSM output before ``out_proj`` (FP32-equivalent,
   :class:`~onnxq.passes.quamba.QuambaPass`) unless ``--outliers none``;
3. calibration on step feeds: calibration text is tokenized and teacher-forced
   through the FP32 graph, and every step's inputs (token + states) is one feed, so
   the states the INT8 graph will see are covered;
4. static per-tensor W8A8 Q/DQ (Quamba uses per-tensor weights), percentile
   clipping on the SSM input;
5. validation: mean cosine of logits vs FP32 over teacher-forced held-out text,
   each graph stepping with its own states.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq import io as _io
from onnxq._progress import Progress
from onnxq.errors import CalibrationDataError, OnnxqError
from onnxq.eval.fidelity import Fidelity
from onnxq.recipe import Recipe

__all__ = ["MAMBA_STEPS", "convert_mamba", "is_mamba_step", "text_ids"]

# Teacher-forced steps per sequence for calibration and validation.
MAMBA_STEPS = 64


def is_mamba_step(model: ir.Model) -> bool:
    return model.metadata_props.get("onnxq.task") == "mamba-step"


def text_ids(
    tokenizer_dir: str | os.PathLike[str], texts: list[str], *, sequences: int, length: int
) -> np.ndarray:
    """``[sequences, length]`` token ids from ``texts`` concatenated and cut into rows."""
    from tokenizers import Tokenizer

    path = pathlib.Path(tokenizer_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise CalibrationDataError(f"no tokenizer.json at {tokenizer_dir}")
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    need = sequences * length
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationDataError(
            f"calibration text has {len(ids)} tokens; {need} are needed "
            f"({sequences} sequences of {length})"
        )
    return np.asarray(ids[:need], dtype=np.int64).reshape(sequences, length)


def _texts(calib: str | os.PathLike[str] | None, split: str) -> list[str]:
    from onnxq.calibration import default_text
    from onnxq.calibration.data import read_texts

    if calib is None:
        return default_text.calibration_texts() if split == "calib" else default_text.heldout_texts()
    texts = read_texts(calib)
    cut = len(texts) * 4 // 5
    return texts[:cut] if split == "calib" else texts[cut:]


def convert_mamba(
    model: ir.Model,
    output: str | os.PathLike[str] | None,
    *,
    recipe: Recipe,
    calib: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> Any:
    """Quantize a Mamba step graph (see the module docstring)."""
    from onnxq._api import ConvertResult, _io_sizes, prepare
    from onnxq.calibration.runner import calibrate
    from onnxq.eval.report import build_report, write_reports
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.passes.quamba import QuambaPass, quamba_qdq_options, quamba_target
    from onnxq.runtime.mamba import MambaSession

    progress = progress or Progress(0)
    tok = tokenizer or model.metadata_props.get("onnxq.tokenizer")
    if not tok:
        raise CalibrationDataError("a Mamba model needs a tokenizer for text calibration "
                                   "(--tokenizer FOLDER)")
    with progress.stage("canonicalize"):
        prepare(model)
    fp32 = model.clone()
    sequences = max(1, min(16, (recipe.samples or 256) // 16))
    cal_ids = text_ids(tok, _texts(calib, "calib"), sequences=sequences, length=MAMBA_STEPS)
    methods = [m for m in recipe.outliers if m != "none"]
    outliers: dict[str, Any] = {"methods": [], "sites": []}
    if methods:
        with progress.stage("outlier passes"):
            res = QuambaPass()(model)
            outliers = {"methods": ["quamba-hadamard"],
                        "sites": [{"module": s.get("module", ""), "method": "hadamard"}
                                  for s in getattr(res, "sites", [])]}
    with progress.stage("calibrate"):
        feeds = MambaSession(fp32).calibration_feeds(cal_ids)
        stats = calibrate(model, feeds, meta={"sequences": sequences, "steps": MAMBA_STEPS})
    target = quamba_target(recipe.target)
    with progress.stage("quantize"):
        options = quamba_qdq_options(model)
        options["keep_fp"] = tuple(options["keep_fp"]) + tuple(recipe.keep_fp)
        qres = InsertQDQPass(stats=stats, target=target, method=recipe.method, **options)(model)
    fid = None
    if recipe.validate_samples:
        with progress.stage("validate"):
            val_ids = text_ids(tok, _texts(calib, "heldout"), sequences=4, length=MAMBA_STEPS)
            ref = MambaSession(fp32).teacher_forced_logits(val_ids)
            test = MambaSession(model, optimize=True).teacher_forced_logits(val_ids)
            if not np.all(np.isfinite(test)):
                raise OnnxqError("the quantized model produced NaN or Inf on validation text")
            a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
            b = test.reshape(-1, test.shape[-1]).astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                              1e-12)
            fid = Fidelity(output="logits", samples=int(a.shape[0]), mean_cosine=float(cos.mean()),
                           min_cosine=float(cos.min()),
                           top1_agreement=float(np.mean(a.argmax(1) == b.argmax(1))))
    report = build_report(model=model, recipe=recipe, target=target, qdq=qres, fidelity=fid,
                          outliers=outliers, timings=progress.timings, stats=stats,
                          source=source or "mamba model")
    out_path = None
    if output is not None:
        out_path = pathlib.Path(output)
        with progress.stage("save"):
            _io.save(model, out_path)
            report["output"] = _io_sizes(out_path)
            write_reports(report, out_path)
    return ConvertResult(model=model, output=out_path, fidelity=fid, report=report)
