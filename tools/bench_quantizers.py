#!/usr/bin/env python
"""Compare onnxruntime's quantizers with onnxq on all-MiniLM-L6-v2, side by side.

Every method sees the same FP32 graph (exported by onnxq and canonicalized),
the same calibration feeds (onnxq's default "calib" text, 256 samples,
batch 32 x 128 tokens) and is judged on the same held-out feeds (the "heldout"
split, 256 samples): mean cosine of pooled embeddings vs FP32 and neighbour
recall@10 (onnxq.eval.fidelity). Speed is measured for all graphs interleaved
in one run with FP32 first (onnxq.eval.bench), batch 32 x 128, 2 threads.

Each quantizer runs in a child process, so a crash or an out-of-memory in one
variant is recorded in the table instead of ending the run; the child's peak
RSS is reported.

    python tools/bench_quantizers.py --quick            # smoke run, a few minutes
    python tools/bench_quantizers.py --write-docs       # full run, updates docs/benchmarks.md
    python tools/bench_quantizers.py --onnxq-args "--outliers auto"   # extra onnxq rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import _benchlib

# name -> (kind, description, settings). "static" = quantize_static (QDQ), "dynamic" =
# quantize_dynamic. Settings are symbolic so the child process can build the enums.
ORT_VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ort-qdq-default": ("static", "quantize_static defaults (QDQ, s8s8 per-tensor, MinMax, "
                        "all op types)", {}),
    "ort-s8s8-pc-minmax": ("static", "QDQ s8s8, per-channel weights, MinMax",
                           {"per_channel": True, "activation": "QInt8", "weight": "QInt8",
                            "method": "MinMax"}),
    "ort-s8s8-pc-percentile": ("static", "QDQ s8s8, per-channel weights, Percentile",
                               {"per_channel": True, "activation": "QInt8", "weight": "QInt8",
                                "method": "Percentile"}),
    "ort-s8s8-pc-entropy": ("static", "QDQ s8s8, per-channel weights, Entropy",
                            {"per_channel": True, "activation": "QInt8", "weight": "QInt8",
                             "method": "Entropy"}),
    "ort-matmul-u8": ("static", "QDQ MatMul only, u8 activations, s8 per-tensor weights, "
                      "MinMax", {"ops": ["MatMul"], "activation": "QUInt8", "weight": "QInt8",
                                 "method": "MinMax"}),
    "ort-matmul-s8s8-pc-minmax": ("static", "QDQ MatMul only, s8s8, per-channel weights, "
                                  "MinMax", {"ops": ["MatMul"], "per_channel": True,
                                             "activation": "QInt8", "weight": "QInt8",
                                             "method": "MinMax"}),
    "ort-dynamic-int8": ("dynamic", "quantize_dynamic, QInt8 weights (no calibration)",
                         {"weight": "QInt8"}),
}


# --------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    if not text and isinstance(exc, BaseException):
        return type(exc).__name__
    line = text.splitlines()[0] if text else ""
    prefix = f"{type(exc).__name__}: " if isinstance(exc, BaseException) else ""
    return (prefix + line)[:300]


def _vm(field: str) -> float:
    """VmHWM / VmRSS of this process in MB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _data(fp32: pathlib.Path, tok: str, samples: int, split: str):
    import onnxq
    from onnxq.calibration.data import input_specs, load_calibration

    model = onnxq.load(fp32)
    return load_calibration(None, input_specs(model), tokenizer=tok, samples=samples,
                            batch_size=32, seq_len=128, split=split)


# --------------------------------------------------------------------------- workers


def _applies(name: str, choice: str) -> bool:
    """``choice`` in none/histogram/all: does it apply to ORT variant ``name``?"""
    kind, _, s = ORT_VARIANTS[name]
    if kind != "static":
        return False
    return choice == "all" or (
        choice == "histogram" and s.get("method") in ("Percentile", "Entropy"))


_pads = _applies


def _ort_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    work = pathlib.Path(spec["work"])
    fp32, tok = _benchlib.prepare_minilm(work)
    out = pathlib.Path(spec["output"])
    kind, _, s = ORT_VARIANTS[spec["name"]]
    if kind == "dynamic":
        rss0 = _vm("VmRSS")
        t0 = time.perf_counter()
        quantize_dynamic(str(fp32), str(out), weight_type=getattr(QuantType, s["weight"]))
        return {"seconds": time.perf_counter() - t0, "rss_before_mb": rss0}

    data = _data(fp32, tok, spec["samples"], "calib")
    import onnx

    names = {i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input}
    pad_to = 128 if _pads(spec["name"], spec.get("pad", "histogram")) else None
    pad_id = 0
    if pad_to:
        from onnxq.calibration.data import _pad_id, load_tokenizer

        pad_id = _pad_id(load_tokenizer(tok))

    def padded(feed):
        # ORT's histogram calibrators stack all batches into one array, which fails
        # on batches of different lengths; pad every batch to a fixed length for them.
        if not pad_to:
            return feed
        out = {}
        for k, v in feed.items():
            if v.ndim == 2 and v.shape[1] < pad_to:
                fill = pad_id if k == "input_ids" else 0
                v = np.pad(v, ((0, 0), (0, pad_to - v.shape[1])), constant_values=fill)
            out[k] = v
        return out

    feeds = [padded({k: v for k, v in f.items() if k in names}) for f in data]

    class Reader(CalibrationDataReader):
        """Serves onnxq's calibration batches to onnxruntime's calibrator.

        ``__len__``/``set_range`` let ``CalibStridedMinMax`` feed it a few batches at a time.
        """

        def __init__(self) -> None:
            self.set_range(0, len(feeds))
            self.batches = 0

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(feeds[start_index:end_index])

        def get_next(self):
            feed = next(self._it, None)
            if feed is not None:
                self.batches += 1
            return feed

        def rewind(self) -> None:
            self.set_range(0, len(feeds))

    kwargs: dict[str, Any] = {"quant_format": QuantFormat.QDQ}
    if "per_channel" in s:
        kwargs["per_channel"] = s["per_channel"]
    if "activation" in s:
        kwargs["activation_type"] = getattr(QuantType, s["activation"])
    if "weight" in s:
        kwargs["weight_type"] = getattr(QuantType, s["weight"])
    if "method" in s:
        kwargs["calibrate_method"] = getattr(CalibrationMethod, s["method"])
    if "ops" in s:
        kwargs["op_types_to_quantize"] = s["ops"]
    extra: dict[str, Any] = {}
    if spec.get("max_intermediate"):
        extra["CalibMaxIntermediateOutputs"] = spec["max_intermediate"]
    if _applies(spec["name"], spec.get("stride", "histogram")):
        extra["CalibStridedMinMax"] = 1  # despite the name: any calibrator, batch by batch
    if extra:
        kwargs["extra_options"] = extra
    reader = Reader()
    rss0 = _vm("VmRSS")
    with tempfile.TemporaryDirectory(prefix="ort-calib-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the calibrator writes augmented_model.onnx into the cwd
        try:
            t0 = time.perf_counter()
            quantize_static(str(fp32), str(out), reader, **kwargs)
            dt = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    return {"seconds": dt, "calib_batches": reader.batches, "rss_before_mb": rss0,
            "padded_to": pad_to}


def _onnxq_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxq

    recipe = onnxq.Recipe(**spec["recipe"])
    rss0 = _vm("VmRSS")
    t0 = time.perf_counter()
    res = onnxq.convert(None, spec["output"], recipe=recipe)
    dt = time.perf_counter() - t0
    timings = res.report.get("timings_s", {})
    return {"seconds": dt, "timings_s": timings, "rss_before_mb": rss0,
            "coverage": res.report.get("coverage", {}).get("fraction"),
            "lint": len(res.report.get("lint") or [])}


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result: dict[str, Any]
    try:
        fn = _ort_worker if spec["kind"] == "ort" else _onnxq_worker
        result = {"ok": True, **fn(spec)}
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, nothing raised
        result = {"ok": False, "error": _one_line(exc)}
    result["peak_rss_mb"] = _vm("VmHWM")
    pathlib.Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(suffix=".json", prefix="bq-")
    os.close(fd)
    spec = {**spec, "result": path}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    finally:
        wall = time.perf_counter() - t0
    try:
        text = pathlib.Path(path).read_text()
        result = json.loads(text) if text else None
    finally:
        os.unlink(path)
    if result is None:
        tail = [x for x in proc.stderr.splitlines() if x.strip()][-1:] or [""]
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"ok": False, "error": f"worker died ({why}) {tail[0][:200]}".strip(),
                "wall_s": wall}
    result["wall_s"] = wall
    return result


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Row:
    name: str
    description: str
    path: pathlib.Path | None = None
    ok: bool = True
    error: str = ""
    quant_s: float | None = None
    calib_s: float | None = None
    outlier_s: float | None = None
    peak_rss_mb: float | None = None
    mean_cos: float | None = None
    min_cos: float | None = None
    recall: float | None = None
    median_ms: float | None = None
    speedup: float | None = None
    ops: dict[str, int] = dataclasses.field(default_factory=dict)


def _session(path: pathlib.Path, threads: int, optimized: pathlib.Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


_INT8_MM = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
            "QGemm")
_FLOAT_MM = ("MatMul", "FusedMatMul", "Gemm")


def _optimized_ops(path: pathlib.Path) -> dict[str, int]:
    import collections

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return {"int8_mm": sum(c[o] for o in _INT8_MM), "float_mm": sum(c[o] for o in _FLOAT_MM),
            "Q": c["QuantizeLinear"] + c["DynamicQuantizeLinear"], "DQ": c["DequantizeLinear"]}


def _evaluate(rows: list[Row], fp32: Row, heldout, threads: int, work: pathlib.Path) -> None:
    import numpy as np

    from onnxq.eval.fidelity import collect_outputs, fidelity, first_output

    batches = list(heldout)
    ref_sess = _session(fp32.path, threads)
    out = first_output([o.name for o in ref_sess.get_outputs()])
    ref, _ = collect_outputs(ref_sess, batches, out)
    del ref_sess
    opt_dir = work / "optimized"
    opt_dir.mkdir(exist_ok=True)
    for row in rows:
        if not row.ok:
            continue
        try:
            opt = opt_dir / row.path.name
            sess = _session(row.path, threads, optimized=opt)
            test, _ = collect_outputs(sess, batches, out)
            del sess
            if not np.all(np.isfinite(test)):
                raise ValueError("NaN or Inf in the outputs")
            f = fidelity(ref, test, output=out)
            row.mean_cos, row.min_cos, row.recall = f.mean_cosine, f.min_cosine, f.recall_at_10
            try:
                row.ops = _optimized_ops(opt)
            except Exception:  # noqa: BLE001 - op counts are informative only
                row.ops = {}
        except Exception as exc:  # noqa: BLE001
            row.ok = False
            row.error = "onnxruntime: " + _one_line(exc)


def _speed(rows: list[Row], threads: int, warmup: int, repeat: int,
           seconds: float | None) -> str:
    from onnxq.eval.bench import bench, format_table

    live = [r for r in rows if r.ok]
    res = bench([str(r.path) for r in live], batch=32, seq_len=128, threads=threads,
                warmup=warmup, repeat=repeat, seconds=seconds)
    for r, b in zip(live, res, strict=True):
        r.median_ms, r.speedup = b.median_ms, b.speedup
    return format_table(res, names=[r.name for r in live])


# --------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| method | quantize s | calib stage s | peak RSS MB | mean cos | min cos | "
             "recall@10 | median ms | vs FP32 | int8 / float MatMul, Q, DQ after ORT opt | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ops = (f"{r.ops['int8_mm']} / {r.ops['float_mm']}, {r.ops['Q']}, {r.ops['DQ']}"
               if r.ops else "—")
        note = r.error.replace("|", "\\|") if r.error else ""
        calib = _fmt(r.calib_s, '.1f')
        if r.outlier_s:
            calib += f" (+{r.outlier_s:.1f} outlier passes)"
        lines.append(
            f"| {r.name} | {_fmt(r.quant_s, '.1f')} | {calib} | "
            f"{_fmt(r.peak_rss_mb, '.0f')} | {_fmt(r.mean_cos, '.4f')} | "
            f"{_fmt(r.min_cos, '.4f')} | {_fmt(r.recall, '.3f')} | {_fmt(r.median_ms, '.1f')} | "
            f"{_fmt(r.speedup, '.2f', 'x')} | {ops} | {note} |")
    return "\n".join(lines)


def _machine() -> str:
    isa = _benchlib.cpu_isa()
    flags = f" ({', '.join(isa)})" if isa else ""
    return (f"{_benchlib.cpu_model() or 'unknown CPU'}{flags}, {os.cpu_count()} logical cores, "
            f"{platform.system()} {platform.machine()}")


def docs_section(rows: list[Row], args, command: str, bench_table: str) -> str:
    descr = "\n".join(f"- **{r.name}**: {r.description}" for r in rows)
    calib = "64" if args.quick else str(args.samples)
    held = "64" if args.quick else str(args.heldout)
    return f"""## Static INT8 quantizers on all-MiniLM-L6-v2 (`tools/bench_quantizers.py`)

{_benchlib.provenance(command, machine=_machine())}

All methods start from the same FP32 graph (onnxq export + canonicalize, saved as one
file) and calibrate on the same feeds: onnxq's default "calib" text, {calib} samples,
batch 32, up to 128 tokens. Fidelity: pooled (mask-mean) embeddings vs FP32 on the
disjoint "heldout" split ({held} samples): mean/min cosine and neighbour recall@10.
Speed: all graphs interleaved in one run (FP32 first), batch 32 x 128 synthetic tokens,
{args.threads} threads, onnxruntime CPU with ORT_ENABLE_ALL; "vs FP32" = FP32 median /
this median. "quantize s" is the wall time of the quantize_static / quantize_dynamic call,
or of the whole `onnxq.convert` (export, canonicalize, calibrate, quantize, save; no
validation); "calib stage s" is onnxq's calibrate stage (its outlier-pass stage, which
also runs the model over the calibration data, in parentheses).
"peak RSS" is the peak resident memory of the process that ran the quantizer (onnxq's
includes the PyTorch export). The op counts are taken from the graph onnxruntime
optimizes (`optimized_model_filepath`).

{markdown_table(rows)}

{descr}

Interleaved timing run:

```
{bench_table}
```"""


# --------------------------------------------------------------------------- main


def _parse_onnxq_args(text: str) -> dict[str, Any]:
    """``"--outliers auto --method minmax"`` -> Recipe field changes."""
    import typing

    import onnxq

    fields = {f.name: f for f in dataclasses.fields(onnxq.Recipe)}
    hints = typing.get_type_hints(onnxq.Recipe)
    toks = shlex.split(text)
    changes: dict[str, Any] = {}
    i = 0
    while i < len(toks):
        key = toks[i]
        if not key.startswith("--") or i + 1 >= len(toks):
            raise SystemExit(f"--onnxq-args: expected '--field value' pairs, got {text!r}")
        name = key[2:].replace("-", "_")
        if name not in fields:
            raise SystemExit(f"--onnxq-args: {key} is not a Recipe field "
                             f"({', '.join(fields)})")
        val: Any = toks[i + 1]
        hint = str(hints[name])
        if "tuple" in hint:
            val = tuple(changes.get(name, ())) + tuple(x for x in val.split(",") if x)
        elif "bool" in hint:
            val = val.lower() in ("1", "true", "yes")
        elif "int" in hint:
            val = int(val)
        changes[name] = val
        i += 2
    return changes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return _worker_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/onnxq-bench")
    p.add_argument("--quick", action="store_true",
                   help="64 calibration / held-out samples, 3 timed rounds (smoke run)")
    p.add_argument("--skip-ort", action="store_true", help="only onnxq rows")
    p.add_argument("--ort-variants", default=",".join(ORT_VARIANTS),
                   help="comma-separated subset of: " + ", ".join(ORT_VARIANTS))
    p.add_argument("--targets", default="tensorrt,ort-cpu", help="onnxq targets")
    p.add_argument("--onnxq-args", action="append", default=[],
                   help='extra onnxq rows per target, Recipe fields as options, e.g. '
                        '"--outliers auto" (repeatable)')
    p.add_argument("--samples", type=int, default=256, help="calibration samples")
    p.add_argument("--heldout", type=int, default=256, help="held-out samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20, help="interleaved timed rounds")
    p.add_argument("--seconds", type=float, default=None, help="timing budget instead")
    p.add_argument("--ort-max-intermediate", type=int, default=None,
                   help="CalibMaxIntermediateOutputs for ORT's calibrator (memory bound)")
    p.add_argument("--ort-stride", choices=("none", "histogram", "all"), default="histogram",
                   help="pass CalibStridedMinMax=1 so ORT calibrates one batch at a time: for "
                        "the histogram calibrators (default; without it they stack all "
                        "batches, which fails on batches of different lengths and holds every "
                        "activation in memory), all static variants, or none")
    p.add_argument("--ort-pad", choices=("none", "histogram", "all"), default="none",
                   help="pad ORT's calibration batches to 128 tokens (default none)")
    p.add_argument("--timeout", type=float, default=3600, help="per quantizer, seconds")
    p.add_argument("--write-docs", action="store_true",
                   help="update the bench_quantizers section of docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.heldout, args.warmup, args.repeat = 64, 64, 1, 3
    command = "python tools/bench_quantizers.py" + (" " + shlex.join(argv) if argv else "")
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("fp32.onnx", "fp32.json"):
        (work / stale).unlink(missing_ok=True)

    def say(msg: str) -> None:
        print(f"[bench_quantizers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
              flush=True)

    say(f"exporting FP32 to {work}")
    fp32_path, tok = _benchlib.prepare_minilm(work)
    rows: list[Row] = [Row("fp32", "the FP32 graph all methods start from", fp32_path)]

    if not args.skip_ort:
        for name in [x for x in args.ort_variants.split(",") if x]:
            if name not in ORT_VARIANTS:
                raise SystemExit(f"unknown ORT variant {name!r}")
            row = Row(name, ORT_VARIANTS[name][1], work / f"{name}.onnx")
            row.path.unlink(missing_ok=True)
            say(f"{name} ...")
            res = _run_worker({"kind": "ort", "name": name, "work": str(work),
                               "output": str(row.path), "samples": args.samples,
                               "max_intermediate": args.ort_max_intermediate,
                               "pad": args.ort_pad, "stride": args.ort_stride},
                              args.timeout)
            row.ok, row.error = res["ok"], res.get("error", "")
            row.quant_s, row.peak_rss_mb = res.get("seconds"), res.get("peak_rss_mb")
            if _pads(name, args.ort_pad):
                row.description += "; calibration batches padded to 128 tokens"
            if _applies(name, args.ort_stride):
                row.description += "; extra_options CalibStridedMinMax=1 (one batch at a time)"
            if row.ok and not row.path.exists():
                row.ok, row.error = False, "no output written"
            say(f"{name}: " + (f"{row.quant_s:.1f} s" if row.ok else row.error))
            rows.append(row)

    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    variants += [(a, _parse_onnxq_args(a)) for a in args.onnxq_args]
    for target in [t for t in args.targets.split(",") if t]:
        for label, changes in variants:
            recipe = {"target": target, "samples": args.samples, "validate_samples": 0,
                      **changes}
            name = f"onnxq {target}" + (f" {label}" if label else "")
            slug = name.replace(" ", "_").replace("-", "").replace(",", "_")
            fields = ", ".join(f"{k}={v!r}" for k, v in recipe.items())
            row = Row(name, f"onnxq.convert(None, recipe=Recipe({fields}))",
                      work / f"{slug}.onnx")
            row.path.unlink(missing_ok=True)
            say(f"{name} ...")
            res = _run_worker({"kind": "onnxq", "output": str(row.path), "recipe": recipe},
                              args.timeout)
            row.ok, row.error = res["ok"], res.get("error", "")
            row.quant_s, row.peak_rss_mb = res.get("seconds"), res.get("peak_rss_mb")
            t = res.get("timings_s") or {}
            if "calibrate" in t:
                row.calib_s = t["calibrate"]
                row.outlier_s = t.get("outlier passes")
            say(f"{name}: " + (f"{row.quant_s:.1f} s, stages {t}" if row.ok else row.error))
            rows.append(row)

    say(f"fidelity on {args.heldout} held-out samples")
    heldout = _data(fp32_path, tok, args.heldout, "heldout")
    _evaluate(rows, rows[0], heldout, args.threads, work)
    rows[0].mean_cos, rows[0].min_cos, rows[0].recall = 1.0, 1.0, 1.0
    say("timing all graphs interleaved")
    bench_table = _speed(rows, args.threads, args.warmup, args.repeat, args.seconds)
    print(markdown_table(rows))
    print()
    print(bench_table)
    if args.write_docs:
        path = _benchlib.write_section("bench_quantizers",
                                     docs_section(rows, args, command, bench_table))
        say(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
