"""Ablation of onnxq's outlier methods (the OS+ paper's Table-4 style), W8A8 static.

Runs `onnxq.convert` with each outlier-method combination on
  * all-MiniLM-L6-v2 (the real model, default calibration text, 256 held-out sentences),
  * a tiny random BERT with planted outlier channels (onnxq.zoo),
and prints a markdown table of mean cosine and neighbour recall@10 vs FP32.
With --write-docs the table replaces the ablation section of docs/benchmarks.md.

    python tools/ablation.py [--target tensorrt] [--models minilm,tiny] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import tempfile
import time

import _benchlib

import onnxq

VARIANTS = [
    ("no method", ("none",)),
    ("SmoothQuant (α=0.5)", ("smoothquant",)),
    ("OS+ shift only", ("osplus-shift",)),
    ("OS+ shift+scale", ("osplus",)),
    ("PEG (6 groups)", ("peg",)),
    ("OS+ + explicit FFN shift/scale", ("osplus", "ffn-scaling")),
    ("OS+ + PEG (default `auto`)", ("osplus", "peg")),
]


def _models(names: list[str], work: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    if "minilm" in names:
        out["all-MiniLM-L6-v2"], _ = _benchlib.prepare_minilm(work)
    if "tiny" in names:
        from onnxq.zoo import tiny_bert_onnx

        out["tiny BERT, planted outliers (2 layers, hidden 64)"] = tiny_bert_onnx(work / "tiny")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tensorrt")
    ap.add_argument("--models", default="minilm,tiny")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(args.models.split(","), pathlib.Path(tmp))
        for mname, path in models.items():
            for label, outliers in VARIANTS:
                t0 = time.perf_counter()
                r = onnxq.convert(path, None, recipe=onnxq.Recipe(target=args.target,
                                                                   outliers=outliers))
                f = r.fidelity
                rows.append((mname, label, f.mean_cosine, f.recall_at_10,
                             time.perf_counter() - t0))
                print(f"{mname} | {label} | {f.mean_cosine:.4f} | {f.recall_at_10:.3f}",
                      file=sys.stderr, flush=True)
    lines = [f"Target `{args.target}`, all linear layers and attention MatMuls W8A8 "
             "(per-channel int8 weights, per-tensor int8 activations, percentile 99.999), "
             "256 calibration / 256 held-out sentences of the built-in text; "
             f"measured {datetime.date.today().isoformat()} with "
             f"`python tools/ablation.py --target {args.target} --write-docs`.", "",
             "| model | outlier methods | mean cosine vs FP32 | recall@10 vs FP32 | convert s |",
             "|---|---|---|---|---|"]
    for m, label, cos, rec, dt in rows:
        lines.append(f"| {m} | {label} | {cos:.4f} | {rec:.3f} | {dt:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        _benchlib.write_section("ablation", table, heading="Ablation of outlier methods")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
