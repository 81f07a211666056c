"""Quamba ablation on tiny random Mambas with planted outliers (static per-tensor W8A8).

For each tiny model (``onnxq.zoo.mamba.tiny_mamba_dir``; seeds 0..N-1, hidden 64 so
``D_inner = 128``, plus hidden 48, ``D_inner = 96``, where the Hadamard takes the
Kronecker form 12 x 8) the FP32 decode-step graph is exported, calibrated on
teacher-forced "calib" text (8 sequences x 64 steps, states from the FP32 graph) and
quantized four ways (``onnxq.passes.quamba.quamba_w8a8``):

* plain W8A8: per-tensor symmetric int8 weights and activations, max ranges;
* + percentile: SSM input (x_proj input) range at the 99.999th percentile;
* + Hadamard: ``QuambaPass`` (online Hadamard on the SSM output, folded into out_proj);
* Quamba (both).

Fidelity: logits of every step of 4 held-out sequences x 64 teacher-forced steps
(each graph carries its own states) vs FP32: mean / min cosine and top-1 agreement.

Usage::

    python tools/bench_mamba.py [--seeds 3] [--write-docs]

``--write-docs`` replaces the section between ``<!-- mamba:start -->`` and
``<!-- mamba:end -->`` in docs/benchmarks.md (appending it if absent).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import _benchlib
import numpy as np

VARIANTS: list[tuple[str, dict]] = [
    ("plain W8A8", {"hadamard": False, "percentile": None}),
    ("+ percentile 99.999", {"hadamard": False, "percentile": 99.999}),
    ("+ Hadamard", {"hadamard": True, "percentile": None}),
    ("Quamba (Hadamard + percentile 99.999)", {"hadamard": True, "percentile": 99.999}),
    ("Quamba, percentile 99.9", {"hadamard": True, "percentile": 99.9}),
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run_model(work: pathlib.Path, *, seed: int, hidden: int, steps: int) -> list[dict]:
    from onnxq.calibration.runner import calibrate
    from onnxq.exporters.mamba import export_mamba_step
    from onnxq.passes.quamba import quamba_w8a8
    from onnxq.runtime.mamba import MambaSession
    from onnxq.zoo.mamba import tiny_mamba_dir, tiny_mamba_text_ids

    folder = tiny_mamba_dir(work / f"mamba-h{hidden}-s{seed}", seed=seed, hidden=hidden)
    fp32 = export_mamba_step(folder).model
    calib = tiny_mamba_text_ids(folder, split="calib", sequences=8, length=steps)
    held = tiny_mamba_text_ids(folder, split="heldout", sequences=4, length=steps)
    fp_sess = MambaSession(fp32)
    feeds = fp_sess.calibration_feeds(calib)
    ref = fp_sess.teacher_forced_logits(held)
    stats = calibrate(fp32, feeds, tensors=["backbone.layers.0.mixer.ssm_output"])
    ch = stats["backbone.layers.0.mixer.ssm_output"].ch_absmax
    ratio = float(ch.max() / np.median(ch))
    rows = []
    for name, kw in VARIANTS:
        t0 = time.perf_counter()
        q = quamba_w8a8(fp32, feeds, **kw)
        seconds = time.perf_counter() - t0
        logits = MambaSession(q).teacher_forced_logits(held)
        cos = _cos(logits, ref)
        rows.append({
            "model": f"hidden {hidden} (D_inner {2 * hidden}), seed {seed}",
            "variant": name,
            "mean_cos": float(cos.mean()),
            "min_cos": float(cos.min()),
            "top1": float(np.mean(logits.argmax(-1) == ref.argmax(-1))),
            "seconds": seconds,
            "ratio": ratio,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | SSM-out max / median channel | variant | mean cos | min cos | top-1 agree | quantize s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:.0f}x | {r['variant']} | {r['mean_cos']:.4f} | "
            f"{r['min_cos']:.4f} | {r['top1']:.3f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> str:
    out = []
    for name, _ in VARIANTS:
        sel = [r["mean_cos"] for r in rows if r["variant"] == name and "hidden 64" in r["model"]]
        if sel:
            out.append(f"{name}: {np.mean(sel):.4f}")
    return "; ".join(out)


def docs_section(rows: list[dict], command: str, steps: int) -> str:
    return f"""## Quamba ablation on tiny Mambas (`tools/bench_mamba.py`)

{_benchlib.provenance(command)}

Tiny random `MambaForCausalLM` models from `onnxq.zoo.mamba.tiny_mamba_dir` (2 layers,
state 16, conv 4, vocab 256) with planted outliers: three SSM-output channels (the
`out_proj` input) far above the rest (column "SSM-out max / median channel", layer 0)
and one large residual channel. Each is exported as a decode-step graph
(`onnxq.exporters.mamba.export_mamba_step`), calibrated on 8 teacher-forced sequences x
{steps} steps of the built-in "calib" text (states from the FP32 graph), and quantized
with `onnxq.passes.quamba.quamba_w8a8`: static per-tensor symmetric int8 weights and
activations on every in_proj / x_proj / dt_proj / out_proj / lm_head input (the conv,
the selective scan and the norms stay FP32). Fidelity: logits of 4 held-out sequences x
{steps} teacher-forced steps, each graph stepping with its own states, vs FP32.
D_inner 128 uses one dense Hadamard MatMul; D_inner 96 the Kronecker form H_12 ⊗ H_8.

Mean cosine over the hidden-64 seeds: {_summary(rows)}.

{markdown(rows)}

Reading: the online Hadamard on the SSM output carries the result (plain W8A8 loses the
non-outlier channels of the out_proj input under one per-tensor scale). Percentile
clipping of the SSM input changes nothing measurable here: at 99.999 with 8 x {steps} x
D_inner calibration values the clip sits at (almost) the max, and in an ONNX graph the
quantized SSM input only feeds x_proj (the FP32 scan reads the unquantized tensor;
Quamba's INT8 scan kernel reads the quantized one). Random tiny models have no
heavy-tailed SSM input; the effect Quamba reports on trained Mambas is not reproduced."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="hidden-64 model seeds (default 3)")
    parser.add_argument("--steps", type=int, default=64, help="teacher-forced steps (default 64)")
    parser.add_argument("--no-kronecker", action="store_true", help="skip the hidden-48 model")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-mamba-") as tmp:
        work = pathlib.Path(tmp)
        models = [(s, 64) for s in range(args.seeds)]
        if not args.no_kronecker:
            models.append((0, 48))
        for seed, hidden in models:
            print(f"bench_mamba: hidden {hidden}, seed {seed}", file=sys.stderr, flush=True)
            rows.extend(run_model(work, seed=seed, hidden=hidden, steps=args.steps))
    print(markdown(rows))
    if args.write_docs:
        command = "python tools/bench_mamba.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = _benchlib.write_section("mamba", docs_section(rows, command.strip(), args.steps))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
