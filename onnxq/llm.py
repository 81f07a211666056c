"""Static W8A8 (or W4A8) conversion of exported decoders with a KV cache.

:func:`convert_decoder` is the decoder counterpart of :func:`onnxq.convert`; the graph
contract is the one of :mod:`onnxq.exporters.decoder` (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` ->
``logits``, ``present.{i}.key|value``).  Steps:

1. **opset and canonical form.**  RMSNorm exists as one op (``RMSNormalization``) only
   from opset 23, and the rotation passes need it.  An opset-21/22 decoder whose graph
   holds a decomposed RMSNorm (or a LayerNorm that Hadamard rotation must convert) has
   its ``ai.onnx`` import raised to 23 -- after checking that every op of the graph
   means the same at 23 (:data:`OPSET23_SAFE_OPS`: between 21 and 23 those ops only
   gained element types, ``QuantizeLinear``/``DequantizeLinear`` also optional
   attributes).  Then :func:`onnxq.prepare`.
2. **calibration data.**  Prefill feeds from text: the texts are tokenized (tokenizer
   from ``tokenizer=`` or the model's ``onnxq.tokenizer``; default
   :func:`onnxq.calibration.default_text.calibration_texts`, or a ``.txt`` / ``.jsonl``
   file) and packed into sequences of ``recipe.seq_len`` tokens, each starting like a
   prompt (the tokenizer's special tokens, BOS for LLaMA-style tokenizers) so the
   BOS-only massive activations are seen.  Feeds carry empty pasts
   (``[B, kv_heads, 0, head_dim]``).  After the outlier passes, a few decode-step feeds
   with non-empty pasts are added, produced by running the *transformed* FP32 graph
   (Hadamard folds change what the value cache stores) with
   :class:`onnxq.runtime.DecoderSession`, so the decode-path activations (one query
   row attending to a long cache) are calibrated too.
3. **outlier methods** (``recipe.outliers``, in this order): ``"hadamard"`` --
   :class:`~onnxq.passes.rotate_residual.RotateResidualPass` (QuaRot R1, offline),
   then :class:`~onnxq.passes.online_hadamard.OnlineHadamardPass` on ``"down_proj"``
   (online) and ``"attention_out"`` (per head into v/o_proj); then the norm-site
   methods ``"osplus"`` / ``"osplus-shift"`` / ``"smoothquant"`` (and ``"peg"`` /
   ``"ffn-scaling"``) through :func:`onnxq.pipeline.apply_outlier_passes`.
   ``"auto"`` is :data:`AUTO_METHODS` (chosen by the ablation in docs/benchmarks.md).
4. **calibrate and quantize** with :class:`~onnxq.passes.insert_qdq.InsertQDQPass`:
   per-channel int8 (or blocked int4) weights, per-tensor static activations.  The
   attention MatMuls (Q·Kᵀ, P·V, whose K and V come through the cache ``Concat``) stay
   in floating point unless ``recipe.quantize_attention`` is True
   (:data:`QUANTIZE_ATTENTION_DEFAULT`); the mask ``Add`` is never wrapped.
5. **validate**: logits of the FP32 input graph and of the result over a prefill plus
   :data:`DECODE_STEPS` teacher-forced decode steps on held-out text
   (:func:`onnxq.runtime.teacher_forced_logits`), mean cosine per position.
6. **lower** for targets whose ``max_opset`` < 23 (``jetson``): ``RMSNormalization``
   is decomposed (:class:`~onnxq.passes.decompose_rms_norm.DecomposeRMSNormPass`) and
   the opset import is set back to what it was.  Then save + report.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq._progress import Progress
from onnxq.errors import OnnxqError
from onnxq.recipe import Recipe
from onnxq.targets.profiles import get_target

__all__ = [
    "AUTO_METHODS",
    "DECODE_STEPS",
    "OPSET23_SAFE_OPS",
    "DecoderCalibration",
    "apply_decoder_outliers",
    "convert_decoder",
    "decoder_fidelity",
    "decode_step_feeds",
    "is_decoder",
    "lower_opset",
    "prefill_feeds",
    "token_sequences",
    "upgrade_opset",
]

TASK = "text-generation"

#: Decode steps after the prefill in the fidelity check (the issue's "32 teacher-forced steps").
DECODE_STEPS = 32

#: What ``outliers = ["auto"]`` means for decoders (see docs/benchmarks.md, LLM ablation).
AUTO_METHODS: tuple[str, ...] = ("ffn-scaling",)
# Per-site choice on the tiny decoders (docs/benchmarks.md): the FFN channel outlier
# (large activation channel, small weight row) is a scaling problem -- a rotation spreads
# its energy, and so its quantization noise, over every channel; FFN scaling beats
# Hadamard (+OS+) on both targets, and adding Hadamard to it does not help.

#: Attention MatMuls (Q·Kᵀ, P·V) stay floating point by default for decoders.
QUANTIZE_ATTENTION_DEFAULT = False

#: Ops whose schema changes between opset 21 and 23 only by new element types
#: (bfloat16 in 22, float4e2m1 in 23; Q/DQ also gained optional attributes): a graph
#: made of these and of ops unchanged since <= 21 means the same at 23 and back.
OPSET23_SAFE_OPS = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten",
    "Identity", "QuantizeLinear", "Reshape", "Shape", "Size", "Squeeze", "Transpose",
    "Unsqueeze", "Pad", "If", "Loop", "Scan", "Cos", "Sin", "Acos", "Acosh", "Asin",
    "Asinh", "Atan", "Atanh", "Cosh", "Sinh", "Tan", "Softplus", "Softsign", "Elu", "Selu",
    "ThresholdedRelu", "HardSigmoid", "HardSwish", "Mish", "Round", "Det", "LpNormalization",
})

# Calibration shape defaults for decoders.
_PREFILL_CAP = 128  # at most this many calibration sequences unless recipe.samples says less
_DECODE_FEEDS = 8  # decode-step feeds added to the calibration set
_DECODE_BATCH = 8  # sequences per decode-step feed
_VALIDATE_SEQUENCES = 8
_VALIDATE_PREFILL = 16


# --------------------------------------------------------------------------- metadata


def is_decoder(model: ir.Model) -> bool:
    """True for a graph exported by :func:`onnxq.exporters.decoder.export_decoder`."""
    return model.metadata_props.get("onnxq.task") == TASK


def _kv_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]


def _kv_dims(model: ir.Model) -> tuple[int, int]:
    meta = model.metadata_props
    kv = meta.get("onnxq.num_kv_heads")
    hd = meta.get("onnxq.head_dim")
    if kv is None or hd is None:
        for v in _kv_inputs(model):
            shape = v.shape
            if shape is not None and len(shape) == 4 and all(isinstance(shape[a], int) for a in (1, 3)):
                return int(shape[1]), int(shape[3])
        raise OnnxqError("the decoder has no onnxq.num_kv_heads / onnxq.head_dim metadata "
                         "and its past inputs have no static shape")
    return int(kv), int(hd)


# --------------------------------------------------------------------------- opset


def _opset(model: ir.Model) -> int:
    from onnxq.passes._ir_utils import opset

    return opset(model)


def _changed_ops(model: ir.Model, lo: int, hi: int) -> list[str]:
    """Default-domain ops of ``model`` whose schema differs between ``lo`` and ``hi``."""
    import onnx.defs

    changed = []
    for op in sorted({n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")}):
        try:
            a = onnx.defs.get_schema(op, lo).since_version
        except Exception:  # op does not exist at lo
            a = None
        try:
            b = onnx.defs.get_schema(op, hi).since_version
        except Exception:
            b = None
        if a != b:
            changed.append(op)
    return changed


def _has_decomposed_rms(model: ir.Model) -> bool:
    from onnxq.passes.fuse_rms_norm import _match

    for node in model.graph:
        if node.domain == "" and node.op_type in ("Pow", "Mul"):
            if not isinstance(_match(node), str):
                return True
    return False


def upgrade_opset(model: ir.Model, *, layernorm: bool = False) -> int | None:
    """Raise the ``ai.onnx`` import of ``model`` to 23 when that enables RMSNorm fusion.

    Done when the opset is below 23 and the graph holds a decomposed RMSNorm (or, with
    ``layernorm``, a ``LayerNormalization`` the residual rotation must turn into
    ``RMSNormalization``), and every op of the graph means the same at 23.

    Returns:
        The previous opset if it was raised, else None.
    """
    old = _opset(model)
    if old >= 23 or old < 18:
        return None
    wanted = _has_decomposed_rms(model) or (
        layernorm and any(n.op_type == "LayerNormalization" for n in model.graph))
    if not wanted:
        return None
    unsafe = [op for op in _changed_ops(model, old, 23) if op not in OPSET23_SAFE_OPS]
    if unsafe:
        return None
    key = "" if "" in model.opset_imports else "ai.onnx"
    model.opset_imports[key] = 23
    return old


def lower_opset(model: ir.Model, opset: int) -> dict[str, Any]:
    """Bring an opset-23 decoder back to ``opset`` (decompose ``RMSNormalization``).

    Raises:
        OnnxqError: the graph holds ops that cannot be expressed at ``opset``.
    """
    from onnxq.passes.decompose_rms_norm import DecomposeRMSNormPass

    current = _opset(model)
    if current <= opset:
        return {"from": current, "to": current, "rms_decomposed": 0}
    res = DecomposeRMSNormPass()(model)
    if res.skipped:
        raise OnnxqError(f"cannot lower to opset {opset}: RMSNormalization "
                         f"{res.skipped[0]['node']!r} {res.skipped[0]['reason']}")
    unsafe = [op for op in _changed_ops(model, opset, current) if op not in OPSET23_SAFE_OPS]
    if unsafe:
        raise OnnxqError(f"cannot lower the graph to opset {opset}: it uses {', '.join(unsafe)}")
    key = "" if "" in model.opset_imports else "ai.onnx"
    model.opset_imports[key] = opset
    return {"from": current, "to": opset, "rms_decomposed": res.decomposed}


# --------------------------------------------------------------------------- data


def _load_tokenizer(model: ir.Model, tokenizer: str | os.PathLike | None):
    from onnxq.calibration.data import load_tokenizer

    spec = tokenizer or model.metadata_props.get("onnxq.tokenizer")
    if not spec:
        raise OnnxqError("decoder calibration needs a tokenizer: pass --tokenizer (a folder "
                         "or tokenizer.json); the model has no onnxq.tokenizer metadata")
    return load_tokenizer(spec)


def token_sequences(tokenizer: Any, texts: Sequence[str], count: int, length: int,
                    *, vocab_size: int | None = None) -> np.ndarray:
    """``[count, length]`` int64 token sequences packed from ``texts``.

    Every sequence starts with one text encoded *with* the tokenizer's special tokens
    (like a prompt: BOS first for LLaMA-style tokenizers) and continues with the next
    texts encoded without them, until ``length`` tokens; texts are used in order and
    reused cyclically when they run out.
    """
    if not texts:
        raise OnnxqError("no text for decoder calibration")
    if count <= 0 or length <= 0:
        raise OnnxqError("sequence count and length must be positive")
    out = np.zeros((count, length), dtype=np.int64)
    cache: dict[tuple[int, bool], list[int]] = {}

    def enc(i: int, special: bool) -> list[int]:
        key = (i, special)
        if key not in cache:
            cache[key] = list(tokenizer.encode(texts[i], add_special_tokens=special).ids)
        return cache[key]

    j = 0
    for row in range(count):
        ids = list(enc(j % len(texts), True))
        j += 1
        guard = 0
        while len(ids) < length:
            more = enc(j % len(texts), False)
            j += 1
            guard = guard + 1 if not more else 0
            if guard > len(texts):
                raise OnnxqError("the calibration texts tokenize to nothing")
            ids += more
        out[row] = ids[:length]
    if vocab_size:
        if out.max() >= vocab_size:
            raise OnnxqError(f"the tokenizer produces id {int(out.max())}, beyond the model's "
                             f"vocabulary of {vocab_size}")
    return out


def _empty_pasts(model: ir.Model, batch: int) -> dict[str, np.ndarray]:
    kv_heads, head_dim = _kv_dims(model)
    return {v.name: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for v in _kv_inputs(model)}


def prefill_feeds(model: ir.Model, sequences: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Prefill feeds (no padding, empty pasts) of ``sequences`` in batches."""
    feeds = []
    names = {v.name for v in model.graph.inputs}
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start:start + batch_size]
        b, s = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64)}
        if "position_ids" in names:
            feed["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        feed.update(_empty_pasts(model, b))
        feeds.append(feed)
    return feeds


def decode_step_feeds(model: ir.Model, sequences: np.ndarray, *, steps: int,
                      prefill_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """Decode-step feeds with a real cache, made by running ``model`` (FP32).

    The first ``prefill_len`` tokens (default: what leaves ``steps`` tokens) of every
    sequence are prefilled; each of the next ``steps`` tokens is one feed
    (``input_ids [B, 1]``, the cache so far as the pasts), then fed to advance the cache.
    """
    from onnxq.runtime import DecoderSession

    total = sequences.shape[1]
    steps = min(steps, total - 1)
    if steps <= 0:
        return []
    prefill_len = prefill_len or total - steps
    steps = min(steps, total - prefill_len)
    session = DecoderSession(model, optimize=False)
    session.prefill(sequences[:, :prefill_len])
    b = sequences.shape[0]
    feeds = []
    for k in range(steps):
        t = prefill_len + k
        feed = {"input_ids": sequences[:, t:t + 1].copy(),
                "attention_mask": np.ones((b, t + 1), np.int64)}
        if session.has_position_ids:
            feed["position_ids"] = np.full((b, 1), t, np.int64)
        feed.update({name: np.array(arr) for name, arr in session.past.items()})
        feeds.append(feed)
        session.step(sequences[:, t])
    return feeds


@dataclasses.dataclass
class DecoderCalibration:
    """Token sequences for calibration and validation of one decoder."""

    calib: np.ndarray  # [N, seq_len]
    heldout: np.ndarray  # [M, prefill + DECODE_STEPS]
    prefill_len: int


def make_sequences(model: ir.Model, recipe: Recipe, *, calib: str | os.PathLike | None = None,
                   tokenizer: str | os.PathLike | None = None, text_field: str = "text",
                   validate_sequences: int = _VALIDATE_SEQUENCES,
                   prefill_len: int = _VALIDATE_PREFILL,
                   decode_steps: int = DECODE_STEPS) -> DecoderCalibration:
    """Tokenized calibration and held-out sequences (see the module docstring)."""
    from onnxq.calibration import default_text

    tok = _load_tokenizer(model, tokenizer)
    vocab = model.metadata_props.get("onnxq.vocab_size")
    vocab = int(vocab) if vocab else None
    if calib is None:
        cal_texts = default_text.calibration_texts()
        held_texts = default_text.heldout_texts()
    else:
        from onnxq.calibration.data import read_texts

        texts = read_texts(calib, text_field=text_field)
        if len(texts) < 2:
            raise OnnxqError(f"calibration file {calib} needs at least 2 samples "
                             "(one is held out for validation)")
        # the last fifth (at least one text) is held out for validation
        cut = max(1, len(texts) // 5)
        cal_texts, held_texts = texts[:-cut], texts[-cut:]
    n = min(recipe.samples or _PREFILL_CAP, _PREFILL_CAP)
    cal = token_sequences(tok, cal_texts, n, recipe.seq_len, vocab_size=vocab)
    m = max(1, min(validate_sequences, recipe.validate_samples or validate_sequences))
    held = token_sequences(tok, held_texts, m, prefill_len + decode_steps, vocab_size=vocab)
    return DecoderCalibration(cal, held, prefill_len)


# --------------------------------------------------------------------------- outliers


def _expand(methods: Sequence[str]) -> list[str]:
    out: list[str] = []
    for m in methods:
        if m == "none":
            continue
        out += list(AUTO_METHODS) if m == "auto" else [m]
    return list(dict.fromkeys(out))


def apply_decoder_outliers(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]],
                           recipe: Recipe, *, progress: Progress | None = None,
                           seed: int | None = 0) -> dict[str, Any]:
    """Apply ``recipe.outliers`` to a prepared decoder in place (FP32-equivalent).

    Hadamard rotations first (they need no statistics), then the norm-site methods
    on statistics of the rotated graph.  Returns a JSON-able description.
    """
    from onnxq.passes.online_hadamard import OnlineHadamardPass
    from onnxq.passes.rotate_residual import RotateResidualPass
    from onnxq.pipeline import apply_outlier_passes

    methods = _expand(recipe.outliers)
    report: dict[str, Any] = {"methods": methods, "sites": [], "skipped": []}

    def run(p: ir.passes.PassBase) -> None:
        res = p(model)
        name = type(p).__name__
        report["sites"].extend({"pass": name, **s} for s in getattr(res, "sites", []))
        report["skipped"].extend({"pass": name, **s} for s in getattr(res, "skipped", []))

    hadamard = "hadamard" in methods
    if hadamard:
        run(RotateResidualPass(seed=seed))
        run(OnlineHadamardPass(targets="attention_out", seed=seed))
    rest = tuple(m for m in methods if m != "hadamard")
    if rest:
        # Statistics of the rotated graph; an FFN input that "ffn-scaling" rewrites
        # (a channel-scaling Mul in front of down_proj) is then no longer fed by the
        # gated product, so the online Hadamard below leaves it alone: one method per site.
        sub = apply_outlier_passes(model, feeds, recipe.replace(outliers=rest), progress=progress)
        report["sites"] += sub.get("sites", [])
        report["skipped"] += sub.get("skipped", [])
        if sub.get("note"):
            report["note"] = sub["note"]
    if hadamard:
        run(OnlineHadamardPass(targets="down_proj", seed=seed))
    from onnxq.pipeline import _jsonable

    return _jsonable(report)


# --------------------------------------------------------------------------- fidelity


def decoder_fidelity(reference: Any, model: Any, sequences: np.ndarray, prefill_len: int):
    """Fidelity of ``model``'s logits against ``reference`` over prefill + decode steps.

    Both graphs run :func:`onnxq.runtime.teacher_forced_logits` on ``sequences``
    (``[M, prefill_len + steps]``); every (sequence, position) pair is one sample.
    """
    from onnxq.eval.fidelity import fidelity
    from onnxq.runtime import DecoderSession, teacher_forced_logits

    session_cls = DecoderSession
    if isinstance(model, ir.Model) and model.metadata_props.get("onnxq.kv_cache"):
        from onnxq.runtime.kv import QuantizedKVSession

        session_cls = QuantizedKVSession
    ref = teacher_forced_logits(DecoderSession(reference), sequences, prefill_len)
    test = teacher_forced_logits(session_cls(model), sequences, prefill_len)
    vocab = ref.shape[-1]
    ref, test = ref.reshape(-1, vocab), test.reshape(-1, vocab)
    if not np.all(np.isfinite(test)):
        raise OnnxqError("the quantized decoder produced NaN or Inf logits on the held-out text")
    return fidelity(ref, test, output="logits")


# --------------------------------------------------------------------------- convert


def _load(model: ir.Model | str | os.PathLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    from onnxq._api import load_source

    m, _ = load_source(model, task=TASK)
    if not is_decoder(m):
        raise OnnxqError(f"{model} is not a text-generation decoder")
    return m


def convert_decoder(
    model: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    calib: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    progress: Progress | None = None,
    text_field: str = "text",
    validate: bool = True,
    source: str | None = None,
):
    """Convert an exported decoder to a static INT8 QDQ graph (see the module docstring).

    Args:
        model: the FP32 decoder (modified in place), an ``.onnx`` path or a HF folder.
        output: where to write the quantized model and its reports; None keeps it in memory.
        recipe: the conversion recipe (target, method, outliers, samples, seq_len,
            weight_bits, quantize_attention ...).  ``samples`` sequences (at most 128)
            of ``seq_len`` tokens are calibrated.
        calib: ``.txt`` / ``.jsonl`` text file (the last fifth is held out for the
            fidelity check); None = the embedded default text.
        tokenizer: folder or ``tokenizer.json``; default: the model's ``onnxq.tokenizer``.
        progress: stage timing / progress display.
        text_field: text field of ``.jsonl`` files.
        validate: run the fidelity check (also off when ``recipe.validate_samples`` is 0).
        source: what to call the source in the report.

    Returns:
        :class:`onnxq._api.ConvertResult`; ``fidelity`` is the logits cosine over
        prefill + :data:`DECODE_STEPS` teacher-forced decode steps of held-out text.
    """
    from onnxq import io as _io
    from onnxq._api import ConvertResult, _io_sizes, _materialized, calibrate, prepare, quantize
    from onnxq.eval.report import build_report, write_reports

    recipe = recipe or Recipe()
    progress = progress or Progress(0)
    target = get_target(recipe.target)
    if source is None:
        source = str(model) if not isinstance(model, ir.Model) else "in-memory model"
    with progress.stage("load/export"):
        model = _load(model)
    if not is_decoder(model):
        raise OnnxqError("convert_decoder needs a text-generation decoder "
                         "(metadata onnxq.task = text-generation)")
    if recipe.quantize_attention is None:
        recipe_q = recipe.replace(quantize_attention=QUANTIZE_ATTENTION_DEFAULT)
    else:
        recipe_q = recipe
    methods = _expand(recipe.outliers)
    fp32_bytes = ir.serde.serialize_model(_materialized(model)).SerializeToString()

    with progress.stage("canonicalize"):
        original_opset = upgrade_opset(model, layernorm="hadamard" in methods)
        prepare(model)
    with progress.stage("calibration data"):
        seqs = make_sequences(model, recipe, calib=calib, tokenizer=tokenizer,
                              text_field=text_field)
        feeds = prefill_feeds(model, seqs.calib, recipe.batch_size)
    with progress.stage("outlier passes"):
        outlier_report = apply_decoder_outliers(model, feeds, recipe, progress=progress)
    with progress.stage("calibration data"):
        n_prefill = len(feeds)
        feeds = feeds + decode_step_feeds(model, seqs.calib[:_DECODE_BATCH], steps=_DECODE_FEEDS)
    with progress.stage("calibrate"):
        stats = calibrate(model, feeds, recipe=recipe_q, progress=progress)
    with progress.stage("quantize"):
        qres = quantize(model, stats, recipe=recipe_q)
    kv_bits = recipe.kv_bits
    kv_report = None
    if kv_bits:
        from onnxq.passes.kv_cache import quantize_kv_cache

        with progress.stage("kv cache"):
            res = quantize_kv_cache(model, bits=kv_bits,
                                    group_size=recipe.kv_group_size,
                                    calibration=list(seqs.calib[:8]))
            kv_report = {"bits": kv_bits, "metadata": model.metadata_props.get("onnxq.kv_cache"),
                         "modified": bool(getattr(res, "modified", True))}
    lowered = None
    if _opset(model) > target.max_opset:
        with progress.stage("lower opset"):
            lowered = lower_opset(model, min(original_opset or target.max_opset, target.max_opset))
    fid = None
    if validate and recipe.validate_samples:
        with progress.stage("validate"):
            fid = decoder_fidelity(fp32_bytes, model, seqs.heldout, seqs.prefill_len)
    report = build_report(
        model=model, recipe=recipe_q, target=target, qdq=qres, fidelity=fid,
        outliers=outlier_report, timings=progress.timings, stats=stats, source=source,
    )
    if kv_report is not None:
        report["kv_cache"] = kv_report
    report["decoder"] = {
        "opset": _opset(model),
        "opset_raised_from": original_opset,
        "lowered": lowered,
        "calibration": {"prefill_sequences": int(seqs.calib.shape[0]),
                        "seq_len": int(seqs.calib.shape[1]),
                        "decode_step_feeds": len(feeds) - n_prefill,
                        "decode_batch": int(min(_DECODE_BATCH, seqs.calib.shape[0]))},
        "validation": {"sequences": int(seqs.heldout.shape[0]), "prefill_len": seqs.prefill_len,
                       "decode_steps": int(seqs.heldout.shape[1] - seqs.prefill_len)},
    }
    out_path = None
    if output is not None:
        out_path = pathlib.Path(output)
        with progress.stage("save"):
            _io.save(model, out_path)
            report["output"] = _io_sizes(out_path)
            write_reports(report, out_path)
    return ConvertResult(model=model, output=out_path, fidelity=fid, report=report)
