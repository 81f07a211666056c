"""Per-layer error of a quantized (QDQ) graph against its FP32 original.

:func:`compare` finds every quantized activation of the quantized graph, i.e. the
input ``X`` of a ``QuantizeLinear`` whose ``DequantizeLinear`` output feeds a
``MatMul``/``Gemm``, and the output of each such layer (the bias ``Add`` output
when the MatMul has a constant bias, else the MatMul output; through the ``Sum``
of a PEG split). It runs both graphs on the same data with those tensors as extra
outputs and accumulates, per tensor, the signal ``Σ x²`` and the error
``Σ (x − x̂)²`` batch by batch (memory does not depend on the number of samples):

* ``sqnr_db = 10 · log10(Σ x² / Σ (x − x̂)²)`` and ``rel_error = sqrt(Σ (x − x̂)² / Σ x²)``
  where ``x`` is the FP32 tensor and ``x̂`` the quantized graph's value (for an
  activation: the ``DequantizeLinear`` output, i.e. upstream error plus its own
  rounding);
* ``local_sqnr_db`` (activations only): ``X`` against its own ``DequantizeLinear``
  output inside the quantized graph, the rounding/clipping noise of that one
  Q/DQ pair, independent of upstream layers.

Matching is by value name: a graph from onnxq keeps the canonical graph's names,
onnxruntime's ``quantize_static`` keeps ``X`` as the ``QuantizeLinear`` input (and
names the pair ``X_QuantizeLinear_Output`` / ``X_DequantizeLinear_Output``).
Tensors that onnxq's FP32-equivalent outlier passes changed are mapped back to the
FP32 graph by replaying the change on the FP32 tensor: a LayerNorm whose γ/β were
folded (OS+, SmoothQuant: ``x̃ = (x − β)·γ'/γ + β'``), a PEG ``Gather`` of channel
groups, and the ``Mul``/``Add``/``Sub``/``Div`` by constants the passes insert.
Anything else without an FP32 counterpart gets ``sqnr_db = None`` and a note.

Rows of padding tokens (``attention_mask == 0``) are left out for ``[batch, seq, …]``
tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq._progress import Progress
from onnxq.calibration.runner import make_session
from onnxq.errors import CalibrationDataError, OnnxqError
from onnxq.passes._ir_utils import PASS_KEY
from onnxq.passes._patterns import module_of

__all__ = ["LayerError", "compare", "format_ranking", "quantized_sites", "ranking"]

_FOLDED_KEY = "onnxq.folded"
_PERM_KEY = "onnxq.peg.perm"  # onnxq.passes.peg.PERM_KEY
_NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
_ELEMENTWISE = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}


@dataclasses.dataclass
class LayerError:
    """Error of one tensor of the quantized graph against FP32.

    Attributes:
        index: position in graph order (0-based, over all rows).
        tensor: the tensor's name in the quantized graph.
        module: module path of the layer (``onnxq.module`` of the MatMul).
        role: ``"activation"`` (a quantized input, compared after DequantizeLinear),
            ``"output"`` (the layer's output) or ``"model-output"``.
        sqnr_db: SQNR against FP32 in dB (None when there is no FP32 counterpart;
            ``inf`` when equal).
        rel_error: ``||x − x̂|| / ||x||`` against FP32.
        local_sqnr_db: activations only: SQNR of the Q/DQ pair alone.
        note: how the FP32 reference was obtained, or why there is none.
    """

    index: int
    tensor: str
    module: str
    role: str
    sqnr_db: float | None
    rel_error: float | None
    local_sqnr_db: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("sqnr_db", "rel_error", "local_sqnr_db"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None if math.isnan(d[k]) else 999.0
        return d


# ------------------------------------------------------------------ matching
def _is_const(v: ir.Value | None) -> bool:
    if v is None:
        return True
    if v.is_graph_input():
        return False
    if v.const_value is not None:
        return True
    p = v.producer()
    if p is None:
        return False
    if p.op_type == "Constant":
        return True
    # a dequantized weight: DequantizeLinear of a constant
    return p.op_type == "DequantizeLinear" and _is_const(p.inputs[0]) and \
        (p.inputs[0].producer() is None or p.inputs[0].producer().op_type != "QuantizeLinear")


def _const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = v.const_value
    if t is None:
        p = v.producer()
        if p is not None and p.op_type == "Constant":
            attr = p.attributes.get("value")
            t = attr.value if attr is not None else None
    return None if t is None else np.asarray(t.numpy())


@dataclasses.dataclass
class _Activation:
    x: ir.Value  # QuantizeLinear input
    dq: ir.Value  # DequantizeLinear output read by the MatMul


def quantized_sites(model: ir.Model) -> list[tuple[str, str, str, str]]:
    """``(role, tensor, module, dq_output)`` rows of ``model`` in graph order.

    ``dq_output`` is the DequantizeLinear output for activations, ``""`` for outputs.
    """
    rows: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        acts = []
        for inp in node.inputs[:2]:
            p = inp.producer() if inp is not None else None
            if p is None or p.op_type != "DequantizeLinear":
                continue
            q = p.inputs[0].producer() if p.inputs[0] is not None else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            x = q.inputs[0]
            if x is None or _is_const(x) or not x.name:
                continue
            acts.append(_Activation(x, inp))
        if not acts:
            continue
        module = module_of(node)
        for a in acts:
            if a.x.name not in seen:
                seen.add(a.x.name)
                rows.append(("activation", a.x.name, module, a.dq.name or ""))
        out = _layer_output(node)
        if out is not None and out.name and out.name not in seen:
            seen.add(out.name)
            rows.append(("output", out.name, module, ""))
    return rows


def _single_use(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) == 1 and not v.is_graph_output():
        return uses[0].node
    return None


def _layer_output(matmul: ir.Node) -> ir.Value | None:
    out = matmul.outputs[0]
    user = _single_use(out)
    if user is not None and user.op_type == "Sum":  # PEG partial products
        out = user.outputs[0]
        user = _single_use(out)
    if user is not None and user.op_type == "Add":
        other = [i for i in user.inputs if i is not out]
        if len(other) == 1 and _is_const(other[0]):
            return user.outputs[0]
    return out


# ------------------------------------------------------------- FP32 reference
Ref = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def _split_sizes(node: ir.Node) -> list[int] | None:
    """The output sizes of a ``Split`` (from its input or its ``split`` attribute)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = _const_array(node.inputs[1])
        return None if arr is None else [int(x) for x in arr.reshape(-1)]
    attr = node.attributes.get("split")
    return None if attr is None else [int(x) for x in attr.as_ints()]


class _Resolver:
    """Builds, per quantized-graph value, a function of FP32 tensors giving its reference."""

    def __init__(self, fp32: ir.Model, q: ir.Model) -> None:
        self.fp32_values: dict[str, ir.Value] = {}
        for v in fp32.graph.inputs:
            self.fp32_values[v.name] = v
        for node in fp32.graph:
            for o in node.outputs:
                if o.name:
                    self.fp32_values[o.name] = o
        self.needed: set[str] = set()

    def resolve(self, v: ir.Value, depth: int = 0) -> tuple[Ref | None, str]:
        if v is None or depth > 6:
            return None, "no FP32 counterpart"
        name = v.name or ""
        prod = v.producer()
        tags = dict(prod.metadata_props) if prod is not None else {}
        transformed = PASS_KEY in tags or _FOLDED_KEY in tags
        ref_v = self.fp32_values.get(name)
        perm = tags.get(_PERM_KEY)
        if ref_v is not None and perm:
            # PEG's contiguous layout permuted this tensor's channels (same name)
            order = np.array([int(i) for i in perm.split(",")], dtype=np.int64)
            self.needed.add(name)
            return (lambda o, n=name, p=order: np.take(o[n], p, axis=-1)), \
                "FP32 reference with PEG's channel permutation"
        if ref_v is not None and prod is not None and prod.op_type == "Sum" \
                and tags.get(PASS_KEY) == "PerEmbeddingGroupPass":
            # PEG's Sum of partial products is the original MatMul (same name, same value)
            self.needed.add(name)
            return (lambda o, n=name: o[n]), ""
        if ref_v is not None:
            ref_prod = ref_v.producer()
            ref_tags = dict(ref_prod.metadata_props) if ref_prod is not None else {}
            same_tag = tags.get(PASS_KEY) == ref_tags.get(PASS_KEY) and \
                tags.get(_FOLDED_KEY) == ref_tags.get(_FOLDED_KEY)
            if not transformed or same_tag:
                self.needed.add(name)
                return (lambda o, n=name: o[n]), ""
            if prod is not None and prod.op_type in _NORM_OPS and ref_prod is not None \
                    and ref_prod.op_type == prod.op_type:
                fn = self._norm_affine(prod, ref_prod, name)
                if fn is not None:
                    return fn, f"FP32 reference through the refolded {prod.op_type}"
        if prod is None:
            return None, "no FP32 counterpart"
        if prod.op_type == "Gather" and transformed:
            idx = _const_array(prod.inputs[1])
            axis = prod.attributes.get_int("axis", 0)
            data = prod.inputs[0]
            if idx is not None and data is not None:
                inner, note = self.resolve(data, depth + 1)
                if inner is not None:
                    return (lambda o, f=inner, i=idx, a=axis: np.take(f(o), i, axis=a)), \
                        (note or "FP32 reference through the PEG Gather")
        if prod.op_type == "Split" and transformed and prod.inputs and prod.inputs[0] is not None:
            sizes = _split_sizes(prod)
            axis = prod.attributes.get_int("axis", 0)
            if sizes is not None and len(sizes) == len(prod.outputs):
                k = next(i for i, o in enumerate(prod.outputs) if o is v)
                start = int(sum(sizes[:k]))
                inner, note = self.resolve(prod.inputs[0], depth + 1)
                if inner is not None:
                    def take(o, f=inner, a=axis, lo=start, hi=start + int(sizes[k])):
                        x = f(o)
                        return np.take(x, np.arange(lo, hi), axis=a)
                    return take, (note or "FP32 reference through the PEG Split")
        if prod.op_type in _ELEMENTWISE and transformed and len(prod.inputs) == 2:
            a, b = prod.inputs
            op = _ELEMENTWISE[prod.op_type]
            ca, cb = _const_array(a), _const_array(b)
            if cb is not None and ca is None:
                inner, note = self.resolve(a, depth + 1)
                if inner is not None:
                    return (lambda o, f=inner, c=cb: op(f(o), c)), \
                        (note or f"FP32 reference through the inserted {prod.op_type}")
            if ca is not None and cb is None:
                inner, note = self.resolve(b, depth + 1)
                if inner is not None:
                    return (lambda o, f=inner, c=ca: op(c, f(o))), \
                        (note or f"FP32 reference through the inserted {prod.op_type}")
        return None, "no FP32 counterpart (transformed by an outlier pass)" if transformed \
            else "no FP32 counterpart"

    def _norm_affine(self, q_norm: ir.Node, ref_norm: ir.Node, name: str) -> Ref | None:
        g1 = _const_array(ref_norm.inputs[1]) if len(ref_norm.inputs) > 1 else None
        g2 = _const_array(q_norm.inputs[1]) if len(q_norm.inputs) > 1 else None
        if g1 is None or g2 is None:
            return None
        b1 = _const_array(ref_norm.inputs[2]) if len(ref_norm.inputs) > 2 else None
        b2 = _const_array(q_norm.inputs[2]) if len(q_norm.inputs) > 2 else None
        g1 = g1.astype(np.float64)
        g2 = g2.astype(np.float64)
        b1 = np.zeros_like(g1) if b1 is None else b1.astype(np.float64)
        b2 = np.zeros_like(g2) if b2 is None else b2.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(g1 != 0, g2 / g1, 0.0)
        c = b2 - b1 * a
        self.needed.add(name)
        return lambda o, n=name: (o[n] * a + c).astype(np.float32)


# --------------------------------------------------------------- accumulation
class _Acc:
    __slots__ = ("err", "sig", "n")

    def __init__(self) -> None:
        self.sig = 0.0
        self.err = 0.0
        self.n = 0

    def add(self, ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None) -> None:
        r = np.asarray(ref, dtype=np.float64)
        t = np.asarray(test, dtype=np.float64)
        if r.shape != t.shape:
            raise ValueError(f"shapes differ: {r.shape} vs {t.shape}")
        keep = _token_mask(r.shape, mask)
        d = r - t
        if keep is None:
            self.sig += float(np.sum(r * r))
            self.err += float(np.sum(d * d))
            self.n += r.size
        else:
            keep = np.broadcast_to(keep, r.shape)
            self.sig += float(np.sum(r * r, where=keep))
            self.err += float(np.sum(d * d, where=keep))
            self.n += int(np.count_nonzero(keep))

    def sqnr(self) -> float | None:
        if self.n == 0:
            return None
        if self.err == 0.0:
            return math.inf
        if self.sig == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sig / self.err)

    def rel(self) -> float | None:
        if self.n == 0:
            return None
        if self.sig == 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return math.sqrt(self.err / self.sig)


def _token_mask(shape: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray | None:
    """Boolean array broadcastable to ``shape`` that drops padding tokens, or None.

    ``[B, S, ...]``: axis 1 is the token axis; ``[B, H, S, x]`` (attention heads, scores
    and probabilities): every one of axes 2 and 3 whose size is ``S`` is a token axis
    (for scores ``[B, H, S, S]`` both the query rows and the key columns).
    """
    if mask is None or mask.ndim != 2 or len(shape) < 3 or shape[0] != mask.shape[0]:
        return None
    b, s = mask.shape
    m = mask.astype(bool)
    if len(shape) == 3 and shape[1] == s:
        return m.reshape(b, s, 1)
    if len(shape) == 4:
        keep = np.ones((b, 1, 1, 1), dtype=bool)
        found = False
        if shape[2] == s:
            keep = keep & m.reshape(b, 1, s, 1)
            found = True
        if shape[3] == s:
            keep = keep & m.reshape(b, 1, 1, s)
            found = True
        return keep if found else None
    return None


def _tap(model: ir.Model, names: Sequence[str]) -> ir.Model:
    clone = model.clone()
    values: dict[str, ir.Value] = {}
    for v in clone.graph.inputs:
        values[v.name] = v
    for node in clone.graph:
        for o in node.outputs:
            if o.name:
                values[o.name] = o
    existing = {o.name for o in clone.graph.outputs}
    for n in names:
        if n in existing:
            continue
        v = values[n]
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
        clone.graph.outputs.append(v)
        existing.add(n)
    return clone


def compare(
    fp32_model: ir.Model,
    q_model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: Progress | None = None,
) -> list[LayerError]:
    """Per-layer error of ``q_model`` against ``fp32_model`` on ``data``, in graph order.

    Args:
        fp32_model: the FP32 graph (canonical, as ``onnxq.prepare`` leaves it, or any
            graph whose value names the quantized graph kept).
        q_model: the QDQ graph (from onnxq or onnxruntime's ``quantize_static``).
        data: iterable of feed dicts.
        progress: stage timing (``compare``) and a progress bar.

    Returns:
        One :class:`LayerError` per quantized activation and per layer output (and the
        model outputs last), in the quantized graph's order.
    """
    rows = quantized_sites(q_model)
    if not rows:
        raise OnnxqError("the quantized model has no QuantizeLinear/DequantizeLinear "
                         "feeding a MatMul; nothing to compare")
    q_values: dict[str, ir.Value] = {v.name: v for v in q_model.graph.inputs}
    for node in q_model.graph:
        for o in node.outputs:
            if o.name:
                q_values[o.name] = o
    resolver = _Resolver(fp32_model, q_model)
    fp32_outputs = [o.name for o in fp32_model.graph.outputs]
    q_outputs = [o.name for o in q_model.graph.outputs]
    final = [n for n in q_outputs if n in fp32_outputs]
    plan: list[tuple[str, str, str, str, Ref | None, str]] = []
    for role, name, module, dq in rows:
        ref, note = resolver.resolve(q_values[name])
        test = dq if role == "activation" else name
        plan.append((role, name, module, test, ref, note))
    for n in final:
        resolver.needed.add(n)
        plan.append(("model-output", n, "", n, (lambda o, n=n: o[n]), ""))

    q_names = list(dict.fromkeys(
        [p[3] for p in plan] + [p[1] for p in plan if p[0] == "activation"]))
    f_names = sorted(resolver.needed)
    errs = {i: _Acc() for i in range(len(plan))}
    local = {i: _Acc() for i, p in enumerate(plan) if p[0] == "activation"}
    broken: dict[int, str] = {}
    f_inputs = [v.name for v in fp32_model.graph.inputs if v.name not in fp32_model.graph.initializers]
    q_inputs = [v.name for v in q_model.graph.inputs if v.name not in q_model.graph.initializers]
    samples = 0
    progress = progress or Progress(0)
    with progress.stage("compare"), \
            progress.bar("comparing", getattr(data, "num_samples", None)) as update, \
            make_session(_tap(fp32_model, f_names)) as fs, \
            make_session(_tap(q_model, q_names)) as qs:
        for feed in data:
            missing = [n for n in (*f_inputs, *q_inputs) if n not in feed]
            if missing:
                raise CalibrationDataError(f"data has no input {missing[0]!r}")
            try:
                fo = dict(zip(f_names, fs.run(f_names, {k: feed[k] for k in f_inputs}), strict=True))
                qo = dict(zip(q_names, qs.run(q_names, {k: feed[k] for k in q_inputs}), strict=True))
            except Exception as exc:  # onnxruntime: dtype/shape mismatches
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CalibrationDataError(f"batch does not fit the models: {msg}") from None
            mask = feed.get("attention_mask")
            for i, (role, name, _m, test, ref, _n) in enumerate(plan):
                if role == "activation":
                    local[i].add(qo[name], qo[test], mask)
                if ref is None or i in broken:
                    continue
                try:
                    errs[i].add(ref(fo), qo[test], mask)
                except ValueError as exc:
                    broken[i] = f"not comparable: {exc}"
            batch = next(iter(feed.values())).shape[0] if feed else 0
            samples += batch
            update(batch)
    if samples == 0:
        raise CalibrationDataError("the comparison data holds no samples")
    out: list[LayerError] = []
    for i, (role, name, module, _t, ref, note) in enumerate(plan):
        ok = ref is not None and i not in broken
        out.append(LayerError(
            index=i, tensor=name, module=module, role=role,
            sqnr_db=errs[i].sqnr() if ok else None,
            rel_error=errs[i].rel() if ok else None,
            local_sqnr_db=local[i].sqnr() if i in local else None,
            note=broken.get(i, note)))
    return out


def ranking(errors: Sequence[LayerError], *, role: str | None = None) -> list[LayerError]:
    """Rows with an FP32 SQNR, worst (lowest SQNR) first; optionally of one role."""
    rows = [e for e in errors if e.sqnr_db is not None and (role is None or e.role == role)]
    return sorted(rows, key=lambda e: (e.sqnr_db, e.index))


def format_ranking(errors: Sequence[LayerError], *, top: int = 10, title: str = "") -> str:
    """Plain-text table: the ``top`` worst activations and layer outputs by SQNR."""
    lines = [title] if title else []
    for role in ("activation", "output"):
        rows = ranking(errors, role=role)[:top]
        if not rows:
            continue
        lines.append(f"worst {len(rows)} {role}s by SQNR vs FP32:")
        lines.append(f"  {'rank':>4} {'SQNR dB':>8} {'rel.err':>8} {'local dB':>8}  "
                     f"{'module':<44} tensor")
        for k, e in enumerate(rows, 1):
            loc = f"{e.local_sqnr_db:8.1f}" if e.local_sqnr_db is not None else f"{'-':>8}"
            lines.append(f"  {k:>4} {e.sqnr_db:8.2f} {e.rel_error:8.4f} {loc}  "
                         f"{e.module[:44]:<44} {e.tensor}")
    for e in errors:
        if e.role == "model-output" and e.sqnr_db is not None:
            lines.append(f"model output {e.tensor}: SQNR {e.sqnr_db:.2f} dB, "
                         f"relative error {e.rel_error:.4f}")
    return "\n".join(lines)
