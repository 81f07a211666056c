#!/usr/bin/env python
"""Calibration speed and memory of onnxq vs onnxruntime's MinMax quantize_static.

Every measurement runs in its own child process (peak RSS = the child's VmHWM),
on the same FP32 graph (all-MiniLM-L6-v2 exported by onnxq and canonicalized,
saved as one file) and the same feeds (the built-in "calib" text in onnxq's default
batches: at most 32 rows and 1024 padded tokens, up to 128 tokens per sentence; the
sentence list is repeated when more samples are asked for than it
holds):

* ``onnxq-calibrate N``: ``onnxq.calibrate`` (one onnxruntime pass over the data
  for all observers, streaming histograms) on N samples;
* ``ort-minmax-calibrator``: onnxruntime's ``create_calibrator(MinMax)`` +
  ``collect_data`` + ``compute_data`` on the MatMul inputs (the calibration part
  of quantize_static alone);
* ``ort-quantize-static-minmax``: the whole ``quantize_static`` call (QDQ, MatMul
  only, u8 activations, s8 per-channel weights, MinMax).

    python tools/bench_calibration.py                  # 256 vs 2048 samples
    python tools/bench_calibration.py --write-docs     # also updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import _benchlib


def _status(field: str) -> float:
    """A VmXXX field of /proc/self/status in MB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _texts_file(work: pathlib.Path, samples: int, repeat_of: int = 0) -> pathlib.Path:
    """The default calibration sentences, repeated up to ``samples`` lines.

    With ``repeat_of`` the first ``repeat_of`` sentences are repeated instead, so the
    batches have exactly the shapes of the ``repeat_of``-sample run (only the number
    of samples differs).
    """
    from onnxq.calibration import default_text

    base = [t.replace("\n", " ") for t in default_text.calibration_texts(repeat_of or None)]
    texts = (base * (samples // len(base) + 1))[:samples]
    path = work / (f"calib_{samples}_rep{repeat_of}.txt" if repeat_of else f"calib_{samples}.txt")
    path.write_text("\n".join(texts) + "\n")
    return path


def _feeds(fp32: pathlib.Path, tok: str, texts: pathlib.Path, samples: int):
    import onnxq
    from onnxq.calibration.data import input_specs, load_calibration
    from onnxq.recipe import Recipe

    model = onnxq.load(fp32)
    r = Recipe()  # what `onnxq convert` / `onnxq calibrate` use by default
    return model, load_calibration(texts, input_specs(model), tokenizer=tok, samples=samples,
                                   batch_size=r.batch_size, seq_len=r.seq_len,
                                   batch_tokens=r.batch_tokens)


# --------------------------------------------------------------------------- children


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    kind, samples = spec["kind"], spec["samples"]
    fp32, tok, texts = pathlib.Path(spec["fp32"]), spec["tok"], pathlib.Path(spec["texts"])
    model, data = _feeds(fp32, tok, texts, samples)
    base_rss = _status("VmRSS")
    shapes = [next(iter(b.values())).shape for b in data]
    max_len = max(int(s[1]) for s in shapes)
    max_tokens = max(int(s[0]) * int(s[1]) for s in shapes)
    t0 = time.perf_counter()
    if kind == "onnxq":
        import onnxq

        stats = onnxq.calibrate(model, data)
        extra = {"tensors": len(stats.observers)}
    else:
        import numpy as np
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.calibrate import create_calibrator

        names = [v.name for v in model.graph.inputs]
        del model

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(data)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else {k: np.asarray(v) for k, v in b.items()
                                                if k in names}

        with tempfile.TemporaryDirectory() as tmp:
            if kind == "ort-calibrator":
                cal = create_calibrator(str(fp32), ["MatMul"],
                                        augmented_model_path=str(pathlib.Path(tmp) / "aug.onnx"),
                                        calibrate_method=CalibrationMethod.MinMax)
                cal.collect_data(Reader())
                ranges = cal.compute_data()
                extra = {"tensors": len(getattr(ranges, "data", ranges))}
            else:
                quantize_static(str(fp32), str(pathlib.Path(tmp) / "q.onnx"), Reader(),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                                per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
                extra = {}
    seconds = time.perf_counter() - t0
    return {"kind": kind, "samples": samples, "seconds": seconds, "peak_rss_mb": _status("VmHWM"),
            "rss_before_mb": base_rss, "max_len": max_len, "max_tokens": max_tokens,
            "label": spec.get("label", kind), **extra}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main

LABELS = {
    "onnxq": "onnxq.calibrate (all MatMul inputs, histograms + per-channel stats)",
    "ort-calibrator": "onnxruntime MinMax calibrator alone (create_calibrator + collect_data + "
                      "compute_data, MatMul inputs)",
    "ort-static": "onnxruntime quantize_static, MinMax, QDQ, MatMul only (whole call)",
}
_VERSIONS = ("onnxq", "onnxruntime", "onnx", "numpy")


def _markdown(rows: list[dict[str, Any]], command: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Calibration time and memory (`tools/bench_calibration.py`)",
        "",
        f"- Date: {now}; {platform.machine()}, {_ncpu()} logical cores",
        f"- Versions: {_benchlib.versions(_VERSIONS)}",
        f"- Command: `{command}`",
        "",
        "Same FP32 graph (all-MiniLM-L6-v2, onnxq export + canonicalize, one file) and same "
        "feeds for every row: the built-in calibration text (its ~2000 sentences repeated "
        "when more samples are asked for), in onnxq's default batches (`Recipe.batch_size` 32 "
        "rows, `Recipe.batch_tokens` 1024 padded tokens, 128 tokens per sentence at most). "
        "Each row runs in "
        "its own child process; \"peak RSS\" is that process's VmHWM (including the model "
        "and onnxruntime), \"RSS before\" its resident memory after loading model and "
        "tokenizer, before calibrating. Rows with the smallest sample count ran `--rounds` "
        "times, alternating (seconds = fastest round, peak RSS = largest); the others once.",
        "",
        "| what | samples | texts | longest batch (tokens) | largest batch (rows × tokens) "
        "| seconds | peak RSS MB | RSS before MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        texts = (f"first {r['repeat_of']} sentences repeated" if r.get("repeat_of")
                 else "distinct sentences")
        if "error" in r:
            lines.append(f"| {LABELS[r['kind']]} | {r['samples']} | {texts} | | | failed: "
                         f"{r['error']} | | |")
            continue
        lines.append(f"| {LABELS[r['kind']]} | {r['samples']} | {texts} | {r['max_len']} | "
                     f"{r.get('max_tokens', '')} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} |")
    ok = {(r["kind"], r["samples"], r.get("repeat_of", 0)): r for r in rows if "error" not in r}
    notes = []
    sizes = sorted({n for k, n, _ in ok if k == "onnxq"})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        a = ok.get(("onnxq", small, 0))
        for rep, what in ((small, f"same batch shapes ({small} sentences repeated)"),
                          (0, "distinct sentences, so longer batches")):
            b = ok.get(("onnxq", large, rep))
            if a and b:
                notes.append(f"- onnxq peak RSS, {large} vs {small} samples, {what}: "
                             f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x "
                             f"({b['peak_rss_mb']:.0f} vs {a['peak_rss_mb']:.0f} MB; longest "
                             f"batch {b['max_len']} vs {a['max_len']} tokens); time "
                             f"{b['seconds'] / a['seconds']:.1f}x.")
    else:
        small = sizes[0] if sizes else None
    for k in ("ort-calibrator", "ort-static"):
        if small is not None and (k, small, 0) in ok and ("onnxq", small, 0) in ok:
            notes.append(f"- {small} samples: onnxq.calibrate takes "
                         f"{ok[('onnxq', small, 0)]['seconds'] / ok[(k, small, 0)]['seconds']:.2f}x "
                         f"the time of the {LABELS[k].split(' (')[0]}.")
    return "\n".join(lines + [""] + notes)


def _ncpu() -> int:
    import os

    return os.cpu_count() or 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[256, 2048],
                    help="onnxq sample counts to measure (default 256 2048).")
    ap.add_argument("--ort-samples", type=int, default=256,
                    help="samples for the onnxruntime rows (0 = skip them).")
    ap.add_argument("--rounds", type=int, default=2,
                    help="run the rows with the smallest sample count this many times, "
                         "alternating (time = fastest, peak RSS = largest); the machine "
                         "may be shared. Larger runs run once.")
    ap.add_argument("--work", type=pathlib.Path, default=None, help="work folder (cached FP32).")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    work = args.work or pathlib.Path(tempfile.gettempdir()) / "onnxq-bench-calibration"
    work.mkdir(parents=True, exist_ok=True)
    fp32, tok = _benchlib.prepare_minilm(work)
    small = min(args.samples)
    # (kind, samples, repeat_of): repeat_of > 0 = the first `repeat_of` sentences repeated
    plan = [("onnxq", n, 0) for n in args.samples]
    plan += [("onnxq", n, small) for n in args.samples if n != small]
    if args.ort_samples:
        plan += [("ort-calibrator", args.ort_samples, 0), ("ort-static", args.ort_samples, 0)]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for rnd in range(max(1, args.rounds)):
        for kind, n, rep in plan:
            if rnd and n > small:  # the slow large runs once: they are there for memory
                continue
            spec = {"kind": kind, "samples": n, "fp32": str(fp32), "tok": tok,
                    "texts": str(_texts_file(work, n, rep)), "repeat_of": rep}
            row = _run_child(spec)
            row["repeat_of"] = rep
            print(json.dumps(row), flush=True)
            old = best.get((kind, n, rep))
            if old is None or "error" in old:
                best[(kind, n, rep)] = row
            elif "error" not in row:
                old["peak_rss_mb"] = max(old["peak_rss_mb"], row["peak_rss_mb"])
                old["rss_before_mb"] = max(old["rss_before_mb"], row["rss_before_mb"])
                old["seconds"] = min(old["seconds"], row["seconds"])
    rows = [best[k] for k in plan]
    command = "python tools/bench_calibration.py " + " ".join(sys.argv[1:])
    md = _markdown(rows, command.strip())
    print(md)
    if args.write_docs:
        _benchlib.write_section("calibration", md)


if __name__ == "__main__":
    main()
