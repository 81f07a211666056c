"""Train a tiny BERT from scratch: vanilla vs clipped softmax vs gated attention.

Bondarenko et al. 2023 (methods §6): attention heads that learn to "do nothing" push
huge logits through the softmax and grow outliers in the FFN output / residual stream.
This trains the same tiny BERT (same seed, data and steps) three times on a synthetic
masked-token task in which attention is useful only part of the time:

* sequences ``[CLS] a [SEP] b [SEP]``, 15 content tokens each; in half of them ``b`` is a
  copy of ``a`` (a masked token can be read from its twin), in the other half ``b`` is
  random (attending is useless, the head should do nothing);
* 15 % of the content tokens are masked; loss = cross-entropy on them.

Then, per variant: max |x| and mean kurtosis of the FFN outputs (``output.dense``) and of
the residual sums (``output.LayerNorm`` inputs) on held-out batches, the FP masked-token
accuracy, and W8A8 fidelity of ``last_hidden_state`` (export with
``onnxq.torch.export_module`` → canonicalize → minmax calibration → static QDQ for the
``tensorrt`` target, incl. Q·Kᵀ/P·V; the clipped-softmax output on a fixed [0, 1] grid).

    python tools/train_outlier_free.py [--max-steps 400] [--batch 32] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

START, END = "<!-- outlier_free:start -->", "<!-- outlier_free:end -->"
PAD, CLS, SEP, MASK, FIRST = 0, 1, 2, 3, 5
VARIANTS = [("vanilla", "none"), ("clipped softmax (γ=−0.025)", "clipped"),
            ("gated attention (MLP gate)", "gated")]


def make_batch(rng: np.random.Generator, batch: int, n: int, vocab: int, p_copy: float = 0.5):
    a = rng.integers(FIRST, vocab, size=(batch, n))
    b = rng.integers(FIRST, vocab, size=(batch, n))
    copy = rng.random(batch) < p_copy
    b[copy] = a[copy]
    ids = np.concatenate([np.full((batch, 1), CLS), a, np.full((batch, 1), SEP), b,
                          np.full((batch, 1), SEP)], axis=1)
    content = np.zeros_like(ids, dtype=bool)
    content[:, 1:n + 1] = True
    content[:, n + 2:2 * n + 2] = True
    masked = content & (rng.random(ids.shape) < 0.15)
    labels = np.where(masked, ids, -100)
    inputs = np.where(masked, MASK, ids)
    # variable lengths: pad the tail of some rows (drop part of b)
    mask = np.ones_like(ids)
    for r in range(batch):
        if rng.random() < 0.3:
            cut = int(rng.integers(n + 3, ids.shape[1]))
            mask[r, cut:] = 0
            inputs[r, cut:] = PAD
            labels[r, cut:] = -100
    return inputs.astype(np.int64), mask.astype(np.int64), labels.astype(np.int64)


def build(method: str, args, seed: int):
    import transformers

    from onnxq.torch import patch

    cfg = transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=64, type_vocab_size=2, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg)
    model.config._attn_implementation = "eager"
    patch(model, method)
    return model


def train(model, args, seed: int):
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    start, step = time.time(), 0
    losses = []
    while time.time() - start < args.seconds and step < args.max_steps:
        step += 1
        warm = min(1.0, step / 100)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        ids, mask, labels = (torch.from_numpy(x) for x in make_batch(rng, args.batch, args.n, args.vocab))
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return step, time.time() - start, float(np.mean(losses[-50:]))


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    m, v = x.mean(), x.var(unbiased=False)
    return float(((x - m) ** 4).mean() / v.clamp_min(1e-12) ** 2)


@torch.no_grad()
def outlier_stats(model, feeds):
    ffn, res, acc = [], [], []
    hooks = []
    for layer in model.bert.encoder.layer:
        hooks.append(layer.output.dense.register_forward_hook(
            lambda m, i, o: ffn.append(o.detach())))
        hooks.append(layer.output.LayerNorm.register_forward_pre_hook(
            lambda m, i: res.append(i[0].detach())))
    correct = total = 0
    for ids, mask, labels in feeds:
        ffn.clear(), res.clear()
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        lab = torch.from_numpy(labels)
        sel = lab != -100
        correct += int((logits.argmax(-1)[sel] == lab[sel]).sum())
        total += int(sel.sum())
        m = torch.from_numpy(mask).bool()
        acc.append(([t[m] for t in ffn], [t[m] for t in res]))
    for h in hooks:
        h.remove()
    layers = len(model.bert.encoder.layer)
    f_all = [torch.cat([a[0][i] for a in acc]) for i in range(layers)]
    r_all = [torch.cat([a[1][i] for a in acc]) for i in range(layers)]
    return {
        "ffn_max": max(float(t.abs().max()) for t in f_all),
        "res_max": max(float(t.abs().max()) for t in r_all),
        "ffn_kurt": float(np.mean([_kurtosis(t) for t in f_all])),
        "res_kurt": float(np.mean([_kurtosis(t) for t in r_all])),
        "acc": correct / max(total, 1),
    }


def w8a8(model, cal_feeds, val_feeds):
    from onnxq._api import prepare, validate
    from onnxq.calibration.runner import calibrate
    from onnxq.passes import _patterns
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.targets.profiles import get_target
    from onnxq.torch import LearnedStats, export_module

    # Until the matcher knows the clipped-softmax pattern: let P·V detection look through
    # Clip so that the clipped probabilities are quantized like plain ones (fair compare).
    _patterns._PASS_THROUGH.add("Clip")
    graph = export_module(model.bert)
    prepare(graph)
    fp32 = graph.clone()
    feeds = [{"input_ids": i, "attention_mask": m, "token_type_ids": np.zeros_like(i)}
             for i, m, _ in cal_feeds]
    vfeeds = [{"input_ids": i, "attention_mask": m, "token_type_ids": np.zeros_like(i)}
              for i, m, _ in val_feeds]
    stats = calibrate(graph, feeds)
    fixed = {}
    for att in _patterns.find_attention_matmuls(graph.graph):
        p = att.node.inputs[0]
        if att.kind == "pv" and p.producer() is not None and p.producer().op_type == "Clip":
            fixed[p.name] = (0.0, 1.0)  # the clipped-softmax output: fixed [0, 1] grid
    InsertQDQPass(stats=LearnedStats(stats, fixed), target=get_target("tensorrt"),
                  method="minmax")(graph)
    return validate(fp32, graph, vfeeds), len(fixed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="time limit per variant")
    ap.add_argument("--max-steps", type=int, default=400, help="same step count for every variant")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of methods: none,clipped,gated")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(12345)
    val = [make_batch(rng, 64, args.n, args.vocab) for _ in range(4)]
    cal = [make_batch(rng, 32, args.n, args.vocab) for _ in range(4)]
    rows = []
    for label, method in VARIANTS:
        if args.only and method not in args.only.split(","):
            continue
        model = build(method, args, args.seed)
        steps, secs, loss = train(model, args, args.seed)
        st = outlier_stats(model, val)
        fid, nfixed = w8a8(model, cal, val)
        rows.append((label, steps, secs, loss, st, fid))
        print(f"{label}: {steps} steps {secs:.0f}s loss {loss:.3f} acc {st['acc']:.3f} "
              f"ffn max {st['ffn_max']:.1f} res max {st['res_max']:.1f} "
              f"kurt {st['ffn_kurt']:.1f}/{st['res_kurt']:.1f} W8A8 cos {fid.mean_cosine:.5f} "
              f"(fixed grids {nfixed})", flush=True)
    lines = [
        f"Tiny BERT ({args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN "
        f"{4 * args.hidden}, vocab {args.vocab}) trained from scratch on CPU for "
        f"{args.max_steps} steps per variant (same seed, data, AdamW lr {args.lr:g}, batch "
        f"{args.batch}) on the synthetic copy-or-noise masked-token task of "
        "`tools/train_outlier_free.py`. Outlier statistics over all layers on 256 held-out "
        "sequences; W8A8 = onnxq static QDQ (`tensorrt` target, per-tensor minmax "
        "activations incl. Q·Kᵀ/P·V, per-channel int8 weights), fidelity of the mean-pooled "
        "`last_hidden_state` vs FP32 on the same held-out sequences.", "",
        "| variant | steps | FP masked-token acc | max \\|FFN out\\| | max \\|residual\\| | "
        "kurtosis FFN out / residual | W8A8 mean cosine | W8A8 1 − cos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, steps, secs, loss, st, fid in rows:
        lines.append(
            f"| {label} | {steps} | {st['acc']:.3f} | {st['ffn_max']:.1f} | {st['res_max']:.1f} | "
            f"{st['ffn_kurt']:.1f} / {st['res_kurt']:.1f} | {fid.mean_cosine:.5f} | "
            f"{1 - fid.mean_cosine:.2e} |")
    lines += ["", f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores shared, "
              f"torch {torch.__version__}. Command: `python tools/train_outlier_free.py "
              f"--max-steps {args.max_steps} --write-docs`. A few minutes of training is far from "
              "the paper's 1 M steps; the effect size here is indicative only."]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        text = path.read_text()
        block = f"{START}\n{table}\n{END}"
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Outlier-free training (clipped softmax, gated attention)\n\n" + block + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
