#!/usr/bin/env python
"""Speed of `onnxq convert --target ort-cpu` on all-MiniLM-L6-v2 vs FP32 and quantize_dynamic.

All graphs are timed **interleaved in one run** (onnxq.eval.bench, FP32 first), at
batch 32 x 128 and at batch 1 x 128, so the ratios survive machine drift and
noisy neighbours; ``--runs`` independent runs (default 3) give the median ratio
and its range. Fidelity: pooled-embedding cosine vs FP32 on the held-out split
of the built-in text (256 samples). Op counts come from the graph onnxruntime
optimizes (``optimized_model_filepath``).

Rows:

* ``fp32``: the FP32 graph (onnxq export + canonicalize);
* ``ort-dynamic``: onnxruntime ``quantize_dynamic`` (QInt8 weights) of that graph;
* ``onnxq ort-cpu``: ``onnxq convert --target ort-cpu`` (default outliers ``auto``);
* ``onnxq ort-cpu +peg``: the same with ``--outliers osplus,peg`` (PEG channel splits,
  the tensorrt default) to show what they cost on CPU;
* ``onnxq ort-cpu none``: no outlier pass;
* ``onnxq ort-cpu fp-attn``: attention MatMuls left in float.

    python tools/bench_speed.py                 # ~10 minutes on 2 cores
    python tools/bench_speed.py --write-docs    # also updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from typing import Any

import _benchlib

# name -> (description, Recipe overrides) for onnxq rows
ONNXQ_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnxq ort-cpu": ("`onnxq convert --target ort-cpu` (default `--outliers auto`)", {}),
    "onnxq ort-cpu +peg": ("same with `--outliers osplus,peg` (PEG splits at FFN inputs)",
                           {"outliers": ("osplus", "peg")}),
    "onnxq ort-cpu none": ("same with `--outliers none`", {"outliers": ("none",)}),
    "onnxq ort-cpu fp-attn": ("default, attention MatMuls (QK^T, PV) left in float",
                              {"quantize_attention": False}),
}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    out = pathlib.Path(spec["out"])
    if spec["kind"] == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(spec["fp32"], str(out), weight_type=QuantType.QInt8)
    else:
        import onnxq
        from onnxq.recipe import Recipe

        kw = dict(spec["recipe"])
        if "outliers" in kw:
            kw["outliers"] = tuple(kw["outliers"])
        onnxq.convert(None, out, recipe=Recipe(target="ort-cpu", validate_samples=0, **kw))
    return {"ok": True}


def _build(name: str, spec: dict[str, Any]) -> str | None:
    if pathlib.Path(spec["out"]).exists():
        return None
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _session(path, threads, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ops(path: pathlib.Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    keys = ("MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMul",
            "FusedMatMul", "Gemm", "QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear",
            "SkipLayerNormalization", "BiasGelu", "Gelu", "Gather", "Sum", "Add", "Mul")
    return ", ".join(f"{k} {c[k]}" for k in keys if c[k])


def _fidelity(paths: dict[str, pathlib.Path], fp32: pathlib.Path, tok: str, threads: int,
              work: pathlib.Path) -> dict[str, dict[str, Any]]:
    import onnxq
    from onnxq.calibration.data import input_specs, load_calibration
    from onnxq.eval.fidelity import collect_outputs, fidelity, first_output

    data = list(load_calibration(None, input_specs(onnxq.load(fp32)), tokenizer=tok,
                                 samples=256, batch_size=32, seq_len=128, split="heldout"))
    ref_s = _session(fp32, threads)
    out = first_output([o.name for o in ref_s.get_outputs()])
    ref, _ = collect_outputs(ref_s, data, out)
    res = {}
    opt_dir = work / "optimized"
    opt_dir.mkdir(exist_ok=True)
    for name, p in paths.items():
        opt = opt_dir / p.name
        test, _ = collect_outputs(_session(p, threads, optimized=opt), data, out)
        f = fidelity(ref, test, output=out)
        res[name] = {"mean_cos": f.mean_cosine, "min_cos": f.min_cosine,
                     "recall": f.recall_at_10, "ops": _ops(opt)}
    return res


def _linear_stack(work: pathlib.Path, threads: int) -> tuple[pathlib.Path, pathlib.Path]:
    """FP32 and onnxq ort-cpu INT8 graphs of one MiniLM layer's linears alone.

    ``x[batch, seq, 384]`` → Q, K, V, O (384×384) → FFN up (384×1536) → FFN down (1536×384),
    chained, each with its bias: the same GEMM shapes and the same per-linear
    Q/DQ as the real graph, and nothing else (no attention, norms or GELU).  The
    INT8 one is built by onnxq's own calibrate + quantize (ort-cpu recipe).
    """
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import onnxq
    from onnxq.recipe import Recipe

    fp32, int8 = work / "linears_fp32.onnx", work / "linears_int8.onnx"
    if fp32.exists() and int8.exists():
        return fp32, int8
    rng = np.random.default_rng(0)
    dims = [384, 384, 384, 384, 384, 1536, 384]
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"linear{i}_MatMul"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"linear{i}_Add")]
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "linears",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 384])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", 384])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(proto, fp32)
    recipe = Recipe(target="ort-cpu", method="minmax", outliers=("none",))
    model = ir.from_proto(proto)
    feeds = [{"x": rng.standard_normal((4, 64, 384)).astype(np.float32)} for _ in range(4)]
    stats = onnxq.calibrate(model, feeds, recipe=recipe)
    onnxq.quantize(model, stats, recipe=recipe)
    onnxq.save(model, int8)
    return fp32, int8


def _gemm_ceiling(work: pathlib.Path, threads: int, repeat: int, sopts: dict) -> list[str]:
    """Markdown lines: INT8 vs FP32 speed of the linears alone, at batch 32 and 1 (× 128)."""
    from onnxq.eval.bench import bench, format_table

    fp32, int8 = _linear_stack(work, threads)
    lines = ["", "GEMM ceiling on this CPU: one layer's six linears alone (same shapes and "
             "per-linear Q/DQ as MiniLM, biases, nothing else), FP32 vs onnxq ort-cpu INT8, "
             "interleaved:", "", "```"]
    ratios = []
    for batch, reps in ((32, repeat), (1, repeat * 5)):
        r = bench([str(fp32), str(int8)], batch=batch, seq_len=128, threads=threads, warmup=3,
                  repeat=reps, session_options=sopts)
        lines += [format_table(r, names=["linears fp32", "linears int8"]), ""]
        ratios.append((batch, r[1].speedup))
    lines[-1] = "```"
    lines += ["", "- " + "; ".join(f"batch {m} x 128: INT8 linears {x:.2f}x FP32" for m, x in ratios)
              + ". The whole graph cannot run faster relative to FP32 than its GEMMs do, unless "
              "the non-GEMM work (norms, GELU, softmax, reshapes; the same ops in both graphs) "
              "also shrinks."]
    return lines


def _median_run(runs: list) -> list:
    """Per model, the result whose speed-up is the median over ``runs`` (lower middle)."""
    out = []
    for i in range(len(runs[0])):
        ranked = sorted((r[i] for r in runs), key=lambda x: x.speedup)
        out.append(ranked[(len(ranked) - 1) // 2])
    return out


def _ratio_cell(runs: list, i: int) -> str:
    """``median x (min-max)`` of model ``i``'s speed-up over the runs."""
    xs = sorted(r[i].speedup for r in runs)
    med = xs[(len(xs) - 1) // 2]
    return f"{med:.2f}x" if len(xs) == 1 else f"{med:.2f}x ({xs[0]:.2f}-{xs[-1]:.2f})"


def _cpu() -> str:
    isa = ", ".join(_benchlib.cpu_isa()) or "no AVX2"
    return f"{_benchlib.cpu_model() or platform.machine()} ({isa}), {os.cpu_count()} logical cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=pathlib.Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20, help="timed rounds at batch 32")
    ap.add_argument("--repeat1", type=int, default=150, help="timed rounds at batch 1")
    ap.add_argument("--rows", default="onnxq ort-cpu,onnxq ort-cpu +peg,onnxq ort-cpu none",
                    help=f"onnxq rows to build, comma-separated, from: {', '.join(ONNXQ_ROWS)}")
    ap.add_argument("--runs", type=int, default=3,
                    help="independent interleaved runs per batch size; the table reports the "
                         "median ratio and the range over the runs")
    ap.add_argument("--session-option", action="append", default=[], metavar="KEY=VALUE",
                    help="onnxruntime session config entry for every timed session")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    from onnxq.eval.bench import bench, format_table

    work = args.work or pathlib.Path(tempfile.gettempdir()) / "onnxq-bench-speed"
    work.mkdir(parents=True, exist_ok=True)
    fp32, tok = _benchlib.prepare_minilm(work)
    paths = {"fp32": fp32}
    desc = {"fp32": "FP32 graph (onnxq export + canonicalize)",
            "ort-dynamic": "onnxruntime `quantize_dynamic`, QInt8 weights"}
    errors = {}
    specs = {"ort-dynamic": {"kind": "dynamic", "fp32": str(fp32), "out": str(work / "dyn.onnx")}}
    for name in [r for r in args.rows.split(",") if r]:
        d, kw = ONNXQ_ROWS[name]
        desc[name] = d
        slug = name.replace(" ", "_").replace("+", "p")
        specs[name] = {"kind": "onnxq", "recipe": kw, "out": str(work / f"{slug}.onnx")}
    for name, spec in specs.items():
        err = _build(name, spec)
        print(f"built {name}: {err or 'ok'}", flush=True)
        if err:
            errors[name] = err
        else:
            paths[name] = pathlib.Path(spec["out"])
    fid = _fidelity(paths, fp32, tok, args.threads, work)
    names = list(paths)
    files = [str(paths[n]) for n in names]
    sopts = dict(kv.split("=", 1) for kv in args.session_option)
    runs32, runs1 = [], []
    for _ in range(max(1, args.runs)):
        runs32.append(bench(files, batch=32, seq_len=128, threads=args.threads, warmup=2,
                            repeat=args.repeat, session_options=sopts))
        print(format_table(runs32[-1], names=names), flush=True)
        runs1.append(bench(files, batch=1, seq_len=128, threads=args.threads, warmup=10,
                           repeat=args.repeat1, session_options=sopts))
        print(format_table(runs1[-1], names=names), flush=True)
    r32, r1 = _median_run(runs32), _median_run(runs1)
    t32 = "\n\n".join(format_table(r, names=names) for r in runs32)
    t1 = "\n\n".join(format_table(r, names=names) for r in runs1)

    ceiling = _gemm_ceiling(work, args.threads, args.repeat, sopts)
    print("\n".join(ceiling), flush=True)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python tools/bench_speed.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        "## INT8 speed on onnxruntime CPU (`tools/bench_speed.py`)",
        "",
        f"- Date: {now}; {_cpu()}",
        f"- Versions: {_benchlib.versions(('onnxruntime', 'onnx', 'numpy'))}",
        f"- Command: `{cmd.strip()}`",
        f"- Session: ORT_ENABLE_ALL, {args.threads} intra-op threads, config entries "
        f"{sopts or 'none'}. "
        "All graphs interleaved in each run, in one child process whose "
        "sessions share one intra-op thread pool (FP32 first); \"vs FP32\" = "
        "FP32 median / this median, per run; the table gives the median over the "
        f"{max(1, args.runs)} runs and their range (ms: the run with the median ratio). "
        "Cosine: pooled embeddings vs FP32 on the held-out "
        "split (256 samples). Op counts after onnxruntime's optimisation.",
        "",
        "| graph | mean cos | min cos | recall@10 | b32 ms | b32 vs FP32 | b1 ms | b1 vs FP32 "
        "| ops after ORT optimisation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, (n, a, b) in enumerate(zip(names, r32, r1, strict=True)):
        f = fid[n]
        lines.append(f"| {n} | {f['mean_cos']:.4f} | {f['min_cos']:.4f} | {f['recall']:.3f} | "
                     f"{a.median_ms:.0f} | {_ratio_cell(runs32, i)} | {b.median_ms:.1f} | "
                     f"{_ratio_cell(runs1, i)} | {f['ops']} |")
    lines.append("")
    lines += [f"- **{n}**: {desc[n]}" for n in names]
    lines += [f"- **{n}**: failed: {e}" for n, e in errors.items()]
    lines += ["", "Interleaved runs:", "", "```", t32, "", t1, "```"] + ceiling
    md = "\n".join(lines)
    print(md)
    (work / "speed.md").write_text(md)
    if args.write_docs:
        _benchlib.write_section("speed", md)


if __name__ == "__main__":
    main()
