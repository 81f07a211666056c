"""QAT W4A8 of all-MiniLM-L6-v2 vs post-training W4A8, on held-out text.

1. PTQ baseline: ``onnxq.convert(None, recipe=Recipe(weight_bits=4))`` (tensorrt target,
   percentile ranges, automatic outlier passes, int4 blocks of 128), fidelity on the
   256 held-out sentences.
2. QAT: ``prepare_qat`` (LSQ activation scales initialised from onnxq percentile
   statistics of the exported graph; int4 blocked weights straight-through), a short
   ``finetune`` against the FP32 model's own embeddings on the *calibration* text, then
   ``export_qdq`` (learned scales) and the same fidelity on the same held-out sentences.

    python tools/qat_minilm.py [--steps 300] [--lr 3e-5] [--hadamard] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shlex
import sys
import time

import torch

START, END = "<!-- qat:start -->", "<!-- qat:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--scale-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mse-weight", type=float, default=1.0, help="weight of the hidden-state MSE term")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--train-embeddings", action="store_true", help="also train the embedding tables")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of fine-tuning")
    ap.add_argument("--hadamard", default="", help="HALO: glob of linears with rotated inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ptq", action="store_true")
    ap.add_argument("--skip-init", action="store_true", help="do not export/evaluate the 0-step model")
    ap.add_argument("--ptq-cosine", type=float, default=None,
                    help="with --skip-ptq: PTQ mean cosine from an earlier run, for the table")
    ap.add_argument("--save", default="", help="write the QAT QDQ model here")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    import onnxq
    from onnxq._api import validate
    from onnxq.calibration import data as _data
    from onnxq.calibration.default_text import calibration_texts
    from onnxq.exporters.hf import default_model_dir
    from onnxq.recipe import Recipe
    from onnxq.torch import export_qdq, finetune, prepare_qat

    folder = default_model_dir()
    recipe = Recipe(weight_bits=4)
    rows = []
    ptq = None
    if not args.skip_ptq:
        t0 = time.time()
        res = onnxq.convert(None, recipe=recipe)
        ptq = res.fidelity
        rows.append(("PTQ W4A8 (`onnxq convert --weight-bits 4`)", ptq, f"{time.time() - t0:.0f} s"))
        print(f"PTQ W4A8: mean cosine {ptq.mean_cosine:.4f}", flush=True)

    elif args.ptq_cosine is not None:
        from onnxq.eval.fidelity import Fidelity

        ptq = Fidelity("last_hidden_state", recipe.validate_samples, args.ptq_cosine, float("nan"))
        rows.append(("PTQ W4A8 (`onnxq convert --weight-bits 4`, earlier run)", ptq, "–"))
    model = transformers.AutoModel.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True
    ).eval()
    texts = calibration_texts(None)
    n_train = len(texts)
    cal = calibration_texts(recipe.samples)
    t0 = time.time()
    prepare_qat(model, texts=cal, tokenizer=folder, weight_bits=4, block_size=recipe.block_size,
                target=recipe.target, method=recipe.method,
                hadamard=args.hadamard or (), batch_size=recipe.batch_size, seq_len=recipe.seq_len)
    t_prep = time.time() - t0
    # QAT before any training = PTQ with the same (plain) graph and percentile ranges
    t0 = time.time()
    from onnxq.torch.qat import float_copy, reference_graph

    fp32 = reference_graph(float_copy(model), model.onnxq_qat, folder)
    val = list(_data.load_calibration(
        None, _data.input_specs(fp32), tokenizer=folder, samples=recipe.validate_samples,
        batch_size=recipe.batch_size, seq_len=recipe.seq_len, split="heldout"))
    if not args.skip_init:
        g0, _ = export_qdq(model, texts=cal, tokenizer=folder)
        f0 = validate(fp32, g0, val, kernels=False)
        rows.append(("fake-quant init, 0 steps (plain graph, percentile ranges, no outlier pass)",
                     f0, f"{time.time() - t0:.0f} s"))
        print(f"QAT init (0 steps): mean cosine {f0.mean_cosine:.4f}", flush=True)

    log = finetune(model, texts, tokenizer=folder, steps=args.steps, lr=args.lr,
                   scale_lr=args.scale_lr, batch_size=args.batch_size, seq_len=args.seq_len,
                   mse_weight=args.mse_weight, warmup=args.warmup, seed=args.seed,
                   train_embeddings=args.train_embeddings, time_budget=args.time_budget,
                   log_every=25)
    t0 = time.time()
    g1, _ = export_qdq(model, texts=cal, tokenizer=folder)
    # exact Q/DQ arithmetic (graph optimisations off), as convert() judges tensorrt graphs
    f1 = validate(fp32, g1, val, kernels=False)
    t_export = time.time() - t0
    sim = _simulation_agreement(model, g1, val)
    print(f"exported QDQ vs fake-quant torch model on the held-out batches: mean cosine "
          f"{sim[0]:.6f} (min {sim[1]:.6f})", flush=True)
    label = f"QAT W4A8, {log.steps} steps ({log.seconds:.0f} s)" + (
        f", HALO Hadamard on `{args.hadamard}`" if args.hadamard else "")
    rows.append((label, f1, f"prep {t_prep:.0f} s + export {t_export:.0f} s"))
    print(f"QAT W4A8: mean cosine {f1.mean_cosine:.4f} (min {f1.min_cosine:.4f}, "
          f"recall@10 {f1.recall_at_10})", flush=True)
    if args.save:
        import onnx_ir as ir

        ir.save(g1, args.save)

    lines = [
        f"all-MiniLM-L6-v2, W4A8 (int4 weights in blocks of {recipe.block_size}, int8 "
        f"per-tensor activations incl. Q·Kᵀ/P·V, target `{recipe.target}`), fidelity vs FP32 "
        f"on {recipe.validate_samples} held-out sentences (onnxq's `heldout` split, "
        "never seen in calibration or fine-tuning).", "",
        "| model | mean cosine | min cosine | recall@10 | time |",
        "|---|---|---|---|---|",
    ]
    for name, f, t in rows:
        rec = f"{f.recall_at_10:.3f}" if f.recall_at_10 is not None else "–"
        mn = f"{f.min_cosine:.4f}" if f.min_cosine == f.min_cosine else "–"
        lines.append(f"| {name} | {f.mean_cosine:.4f} | {mn} | {rec} | {t} |")
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python tools/qat_minilm.py"] + [shlex.quote(a) for a in argv_used])
    lines += ["",
              f"QAT: LSQ scales initialised from onnxq percentile statistics of the plain exported "
              f"graph, {log.steps} AdamW steps (lr {args.lr:g}, scale lr {args.scale_lr:g}, "
              f"warm-up {args.warmup}, cosine decay, batch {args.batch_size}, seq ≤ {args.seq_len}, "
              f"{'trained' if args.train_embeddings else 'frozen'} embedding tables, "
              f"{args.threads} threads) distilling the FP32 model's mean-pooled embeddings "
              f"(1 − cos + {args.mse_weight:g} × relative hidden-state MSE, padding masked) on "
              f"onnxq's calibration text ({n_train} sentences); exported with "
              "`onnxq.torch.export_qdq` (learned activation scales, absmax int4 weights, int8 "
              "embedding rows, all simulated bit-exactly during training). All rows are scored "
              "with exact Q/DQ arithmetic (onnxruntime, graph optimisations off). Exported graph "
              f"vs the fake-quantized torch model on the same held-out batches: mean cosine "
              f"{sim[0]:.5f} (min {sim[1]:.5f}). "
              f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores shared, "
              f"torch {torch.__version__}. Command: `{command}`."]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        _write(table, "QAT W4A8 on all-MiniLM-L6-v2")
    return 0


def _simulation_agreement(model, graph, batches) -> tuple[float, float]:
    """Cosine of the pooled embeddings of the exported QDQ graph (onnxruntime, no graph
    optimisations) and of the fake-quantized torch model, on the same batches."""
    import numpy as np

    from onnxq.calibration.runner import make_session
    from onnxq.eval.fidelity import pooled

    cos = []
    with make_session(graph, optimize=False) as sess, torch.no_grad():
        names = {i.name for i in sess.get_inputs()}
        for feed in batches:
            feed = {k: v for k, v in feed.items() if k in names}
            (got,) = sess.run(["last_hidden_state"], feed)
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
            a, b = pooled(got, feed["attention_mask"]), pooled(want.numpy(), feed["attention_mask"])
            cos.append((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    c = np.concatenate(cos)
    return float(c.mean()), float(c.min())


def _write(table: str, title: str) -> None:
    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
