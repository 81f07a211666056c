"""Train a tiny BERT from scratch: vanilla vs clipped softmax vs gated attention.

Bondarenko et al. 2023 (methods §6): attention heads that learn to "do nothing" (attend
to a delimiter / low-information token whose value is tiny) push the softmax inputs to
extremes and grow outliers in the FFN output / residual stream; clipped softmax
(exact zeros reachable) and gated attention (a per-head, per-token gate) remove the
need.  This trains the same tiny BERT three times (same seed, same batches, same
steps) with masked-language modelling on real English text, on one CPU thread:

* text: the stdlib docstring sentences of :func:`onnxq.calibration.default_text
  .calibration_texts` (≈2 000 sentences, ≈35 k word pieces), tokenized with the
  MiniLM WordPiece tokenizer (``tokenizer.json`` of
  :func:`onnxq.exporters.hf.default_model_dir`) and remapped to the ``--vocab`` most
  frequent pieces (+ ``[PAD] [UNK] [CLS] [SEP] [MASK]``); 10 % of the sentences are
  held out;
* sequences: ``[CLS] s1 [SEP] s2 [SEP] …`` packed to ``--seq`` pieces, so every
  sequence holds many ``[SEP]`` / ``.`` / ``,`` tokens (the paper's no-op targets);
* BERT masking: 15 % of the non-special pieces, 80 % ``[MASK]`` / 10 % random / 10 %
  kept; loss = cross-entropy on them.

Then, per variant, on fixed held-out batches: masked-token accuracy and loss (FP),
max |x| and kurtosis of the FFN outputs (``output.dense``), of both residual sums per
layer (the inputs of ``attention.output.LayerNorm`` and ``output.LayerNorm``) and of the
LayerNorm outputs (what the int8 GEMMs see), and W8A8: ``model.bert`` exported with
``onnxq.torch.export_module`` → canonicalize → minmax calibration on training batches
→ static QDQ (per-channel int8 weights; per-tensor activations incl. Q·Kᵀ / P·V; the
clipped-softmax output on its fixed [0, 1] grid), run in onnxruntime with exact QDQ
arithmetic; its ``last_hidden_state`` goes through the (FP) MLM head → W8A8 masked-token
accuracy / loss, top-1 agreement with FP, and the mean-pooled cosine of ``validate``.

    python tools/train_outlier_free.py [--steps 1500] [--write-docs]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

START, END = "<!-- outlier_free:start -->", "<!-- outlier_free:end -->"
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
N_SPECIAL = 5
VARIANTS = {
    "none": "vanilla",
    "clipped": "clipped softmax",
    "gated": "gated attention",
}
TARGETS = ("tensorrt", "ort-cpu")


# ----------------------------------------------------------------------- data


@dataclasses.dataclass
class Corpus:
    train: list[np.ndarray]  # remapped ids per sentence, no specials
    val: list[np.ndarray]
    vocab: int  # including the specials
    pieces: list[str]  # new id -> word piece
    unk_rate: float  # share of pieces mapped to [UNK]
    unigram_loss: float  # cross-entropy (nats) of the train unigram on val pieces
    majority_acc: float  # accuracy of always predicting the most frequent train piece


def load_corpus(vocab: int = 1024, val_share: float = 0.1, seed: int = 0) -> Corpus:
    """Docstring sentences, WordPiece-tokenized and remapped to the top ``vocab - 5`` pieces."""
    import tokenizers

    from onnxq.calibration.default_text import calibration_texts
    from onnxq.exporters.hf import default_model_dir

    tok = tokenizers.Tokenizer.from_file(str(pathlib.Path(default_model_dir()) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    texts = sorted(set(calibration_texts(None)))
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, int(round(val_share * len(texts))))
    enc = [e.ids for e in tok.encode_batch([texts[i] for i in order], add_special_tokens=False)]
    enc = [s for s in enc if s]
    val_raw, train_raw = enc[:n_val], enc[n_val:]
    counts = collections.Counter(i for s in train_raw for i in s)
    keep = [i for i, _ in counts.most_common(vocab - N_SPECIAL)]
    remap = {old: new + N_SPECIAL for new, old in enumerate(keep)}
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [tok.id_to_token(i) for i in keep]

    def conv(sents):
        return [np.array([remap.get(i, UNK) for i in s], dtype=np.int64) for s in sents]

    train, val = conv(train_raw), conv(val_raw)
    freq = np.bincount(np.concatenate(train), minlength=len(pieces)).astype(np.float64)
    p = (freq + 0.5) / (freq + 0.5).sum()
    val_all = np.concatenate(val)
    all_ids = np.concatenate(train + val)
    return Corpus(
        train=train, val=val, vocab=len(pieces), pieces=pieces,
        unk_rate=float(np.mean(all_ids == UNK)),
        unigram_loss=float(-np.log(p[val_all]).mean()),
        majority_acc=float(np.mean(val_all == int(freq.argmax()))),
    )


def make_batch(rng: np.random.Generator, sents: list[np.ndarray], batch: int, seq: int,
               vocab: int, p_mask: float = 0.15):
    """``[CLS] s [SEP] s [SEP] …`` packed to ``seq`` pieces; BERT 80/10/10 masking."""
    ids = np.empty((batch, seq), dtype=np.int64)
    for r in range(batch):
        row = [CLS]
        while len(row) < seq:
            row.extend(sents[int(rng.integers(len(sents)))].tolist())
            row.append(SEP)
        ids[r] = row[:seq]
    special = ids < N_SPECIAL
    special &= ids != UNK  # [UNK] stands for real words: maskable
    masked = ~special & (rng.random(ids.shape) < p_mask)
    labels = np.where(masked, ids, -100)
    roll = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[masked & (roll < 0.8)] = MASK
    rand = masked & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = rng.integers(N_SPECIAL, vocab, size=int(rand.sum()))
    mask = np.ones_like(ids)
    return inputs, mask, labels


# ----------------------------------------------------------------------- model / training


def build(method: str, args, vocab: int, seed: int):
    import transformers

    from onnxq.torch import patch

    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(64, args.seq), type_vocab_size=2, pad_token_id=PAD,
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg)
    model.config._attn_implementation = "eager"
    if args.sinusoidal_init:
        # sinusoidal *initialisation* of the (still learned) position embeddings: relative
        # offsets become linear in the embedding, which shortens the unigram plateau of a
        # tiny post-LN BERT a lot; same init for every variant.
        pe = model.bert.embeddings.position_embeddings.weight
        n, d = pe.shape
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
        table = torch.zeros(n, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        with torch.no_grad():
            pe.copy_(table * args.sinusoidal_init)
    kw = {}
    if method == "clipped":
        kw["gamma"] = args.gamma
    if method == "gated":
        kw["pi_init"] = args.pi_init
    torch.manual_seed(seed + 1)  # gate init; the BERT weights are identical across variants
    patch(model, method, **kw)
    return model


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class _Probe:
    """Forward hooks collecting the tensors whose outliers are measured."""

    KINDS = ("ffn", "res_attn", "res_ffn", "ln_out")

    def __init__(self, model, reduce):
        self.reduce = reduce  # tensor -> stored value
        self.data = {k: collections.defaultdict(list) for k in self.KINDS}
        self.hooks = []
        for i, layer in enumerate(model.bert.encoder.layer):
            self._post(layer.output.dense, "ffn", i)
            self._pre(layer.attention.output.LayerNorm, "res_attn", i)
            self._pre(layer.output.LayerNorm, "res_ffn", i)
            self._post(layer.attention.output.LayerNorm, "ln_out", 2 * i)
            self._post(layer.output.LayerNorm, "ln_out", 2 * i + 1)

    def _post(self, mod, kind, i):
        self.hooks.append(mod.register_forward_hook(
            lambda m, a, o: self.data[kind][i].append(self.reduce(o.detach()))))

    def _pre(self, mod, kind, i):
        self.hooks.append(mod.register_forward_pre_hook(
            lambda m, a: self.data[kind][i].append(self.reduce(a[0].detach()))))

    def remove(self):
        for h in self.hooks:
            h.remove()


def lr_at(step: int, args) -> float:
    warm = max(1, int(args.warmup * args.steps))
    if step <= warm:
        return args.lr * step / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return args.lr * max(0.0, 1.0 - frac) if args.decay else args.lr


def mlm_loss(model, ids, mask, labels):
    """Masked-LM loss with the head applied to the masked positions only (saves the
    vocabulary projection of the other 85 %)."""
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    sel = labels != -100
    return F.cross_entropy(model.cls(hidden[sel]), labels[sel])


def train(model, corpus: Corpus, args, seed: int, log=print):
    """``args.steps`` AdamW steps on freshly sampled batches (same stream for every variant)."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    model.train()
    probe = _Probe(model, lambda t: float(t.abs().max()))
    start, losses, history = time.time(), [], []
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        ids, mask, labels = (torch.from_numpy(x) for x in
                             make_batch(rng, corpus.train, args.batch, args.seq, corpus.vocab))
        loss = mlm_loss(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            res = max(max(v) for k in ("res_attn", "res_ffn") for v in probe.data[k].values())
            ffn = max(max(v) for v in probe.data["ffn"].values())
            history.append((step, float(np.mean(losses[-args.log_every:])), ffn, res))
            log(f"  step {step:5d} loss {history[-1][1]:.3f} max|ffn| {ffn:6.1f} "
                f"max|res| {res:6.1f} ({time.time() - start:.0f}s)")
        for k in probe.data:
            probe.data[k].clear()
    probe.remove()
    model.eval()
    return time.time() - start, history


# ----------------------------------------------------------------------- evaluation


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    m, v = x.mean(), x.var(unbiased=False)
    return float(((x - m) ** 4).mean() / v.clamp_min(1e-12) ** 2)


def _mlm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int, torch.Tensor]:
    sel = labels != -100
    lg, lab = logits[sel], labels[sel]
    loss = float(F.cross_entropy(lg.double(), lab, reduction="sum"))
    pred = lg.argmax(-1)
    return loss, int((pred == lab).sum()), int(sel.sum()), pred


@torch.no_grad()
def fp_eval(model, feeds):
    """FP masked-token metrics and outlier statistics over the held-out batches."""
    probe = _Probe(model, lambda t: t.reshape(-1, t.shape[-1]))
    loss = correct = total = 0
    preds, sink = [], []
    for ids, mask, labels in feeds:
        res = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    output_attentions=True)
        l_, c, n, p = _mlm(res.logits, torch.from_numpy(labels))
        loss, correct, total = loss + l_, correct + c, total + n
        preds.append(p)
        # attention mass on [CLS] / [SEP] keys per (layer, head), mean over queries
        delim = torch.from_numpy(np.isin(ids, (CLS, SEP)))[:, None, None, :].float()
        sink.append(torch.stack([(a * delim).sum(-1).mean((0, 2)) for a in res.attentions]))
    probe.remove()
    out = {"loss": loss / total, "acc": correct / total, "n_masked": total, "preds": preds}
    sink = torch.stack(sink).mean(0)  # [layers, heads]
    out["sink_mean"], out["sink_head_max"] = float(sink.mean()), float(sink.max())
    # which pieces carry the largest residual values (the paper: delimiters)
    all_ids = np.concatenate([i.reshape(-1) for i, _, _ in feeds])
    tok_max = torch.stack([torch.cat(v).abs().amax(-1) for k in ("res_attn", "res_ffn")
                           for v in probe.data[k].values()]).amax(0)
    top = torch.topk(tok_max, k=min(64, len(tok_max))).indices.numpy()
    out["top_pieces"] = collections.Counter(int(all_ids[i]) for i in top).most_common(3)
    out["delim_share_all"] = float(np.isin(all_ids, (CLS, SEP)).mean())
    out["delim_share_top"] = float(np.isin(all_ids[top], (CLS, SEP)).mean())
    for kind, per_layer in probe.data.items():
        tensors = [torch.cat(v) for _, v in sorted(per_layer.items())]
        # max |x| per held-out batch, averaged (the paper's "averaged across the
        # validation set"), and the overall maximum
        n = len(feeds)
        out[f"{kind}_max"] = max(float(t.abs().max()) for t in tensors)
        out[f"{kind}_batchmax"] = float(np.mean([
            max(float(torch.cat([v[b]]).abs().max()) for v in per_layer.values()) for b in range(n)]))
        out[f"{kind}_kurt"] = float(np.mean([_kurtosis(t) for t in tensors]))
        # largest / median per-feature max |x| (an outlier *channel*, as per-tensor int8 sees it)
        ratios = []
        for t in tensors:
            ch = t.abs().amax(0)
            ratios.append(float(ch.max() / ch.median().clamp_min(1e-12)))
        out[f"{kind}_chratio"] = float(np.max(ratios))
    out["res_max"] = max(out["res_attn_max"], out["res_ffn_max"])
    out["res_batchmax"] = max(out["res_attn_batchmax"], out["res_ffn_batchmax"])
    out["res_kurt"] = float(np.mean([out["res_attn_kurt"], out["res_ffn_kurt"]]))
    return out


def _feed(ids, mask):
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def export_fp(model):
    from onnxq._api import prepare
    from onnxq.torch import export_module

    graph = export_module(model.bert)
    prepare(graph)
    return graph


def quantize(graph, cal_feeds, target: str):
    """Static W8A8 QDQ with onnxq's pass (minmax activations, per-channel int8 weights)."""
    from onnxq.calibration.runner import calibrate
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.targets.profiles import get_target

    q = graph.clone()
    stats = calibrate(q, [_feed(i, m) for i, m, _ in cal_feeds])
    InsertQDQPass(stats=stats, target=get_target(target), method="minmax")(q)
    return q


def fixed_grid_scales(qgraph) -> list[float]:
    """Scales of the QuantizeLinear nodes whose input is a ``Clip(·, 0, 1)`` output."""
    from onnxq.passes.insert_qdq import _is_unit_clip

    out = []
    for node in qgraph.graph:
        if node.op_type == "QuantizeLinear" and _is_unit_clip(node.inputs[0]):
            out.append(float(node.inputs[1].const_value.numpy()))
    return out


@torch.no_grad()
def w8a8_eval(model, graph_fp, qgraph, feeds, fp_preds):
    """MLM metrics of the quantized encoder + FP head, agreement with FP, pooled cosine."""
    from onnxq._api import validate
    from onnxq.calibration.runner import make_session

    loss = correct = total = agree = 0
    cos = []
    with make_session(graph_fp, optimize=False) as ref, make_session(qgraph, optimize=False) as sess:
        for (ids, mask, labels), fp_pred in zip(feeds, fp_preds, strict=True):
            h = sess.run(["last_hidden_state"], _feed(ids, mask))[0]
            if not np.all(np.isfinite(h)):
                raise RuntimeError("the quantized model produced NaN or Inf")
            h_ref = ref.run(["last_hidden_state"], _feed(ids, mask))[0]
            a, b = h.reshape(-1, h.shape[-1]).astype(np.float64), h_ref.reshape(-1, h.shape[-1])
            cos.append((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
            logits = model.cls(torch.from_numpy(h))
            l_, c, n, p = _mlm(logits, torch.from_numpy(labels))
            loss, correct, total = loss + l_, correct + c, total + n
            agree += int((p == fp_pred).sum())
    fid = validate(graph_fp, qgraph, [_feed(i, m) for i, m, _ in feeds], kernels=False)
    return {"loss": loss / total, "acc": correct / total, "agree": agree / total,
            "token_cos": float(np.concatenate(cos).mean()), "pooled_cos": fid.mean_cosine}


# ----------------------------------------------------------------------- driver


def run_variant(method: str, corpus: Corpus, val, cal, args, log=print) -> dict:
    model = build(method, args, corpus.vocab, args.seed)
    secs, history = train(model, corpus, args, args.seed, log=log)
    fp = fp_eval(model, val)
    graph = export_fp(model)
    row = {"method": method, "secs": secs, "history": history, "fp": fp, "w8a8": {}, "grids": {}}
    for target in args.targets:
        q = quantize(graph, cal, target)
        row["grids"][target] = fixed_grid_scales(q)
        row["w8a8"][target] = w8a8_eval(model, graph, q, val, fp["preds"])
    return row


def eval_batches(corpus: Corpus, args):
    rng = np.random.default_rng(12345)
    val = [make_batch(rng, corpus.val, args.eval_batch, args.seq, corpus.vocab)
           for _ in range(args.eval_batches)]
    cal_rng = np.random.default_rng(54321)
    cal = [make_batch(cal_rng, corpus.train, args.eval_batch, args.seq, corpus.vocab)
           for _ in range(args.cal_batches)]
    return val, cal


def format_table(rows, corpus: Corpus, args, command: str, notes: str = "") -> str:
    t0 = args.targets[0]
    lines = [
        f"Tiny BERT (post-LN, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"FFN {4 * args.hidden}, vocabulary {corpus.vocab}) trained from scratch on one CPU "
        f"thread with masked-LM on the stdlib docstring sentences of "
        f"`onnxq.calibration.default_text` (MiniLM WordPiece, remapped to the "
        f"{corpus.vocab - N_SPECIAL} most frequent pieces, {corpus.unk_rate:.1%} [UNK]; "
        f"sentences packed as `[CLS] s [SEP] s [SEP] …` into {args.seq} pieces; "
        f"{len(corpus.val)} sentences held out). Same seed, batches and {args.steps} AdamW "
        f"steps for every variant (batch {args.batch}, lr {args.lr:g}, "
        f"{'linear decay' if args.decay else 'constant'} after {args.warmup:.0%} warm-up, "
        f"weight decay {args.weight_decay:g} except LN/bias, dropout {args.dropout:g}); "
        f"clipped softmax ζ = 1, γ = {args.gamma:g}; gated attention = per-token MLP gate, "
        f"π_init = {args.pi_init:g}.",
        "",
        f"Held-out: {args.eval_batches} × {args.eval_batch} packed sequences "
        f"({rows[0]['fp']['n_masked']} masked pieces; chance = unigram loss "
        f"{corpus.unigram_loss:.2f} nats, majority-piece accuracy {corpus.majority_acc:.3f}). "
        "Outliers over all layers: max |x| (overall; in brackets the per-batch max averaged "
        "over the held-out batches) and kurtosis (per layer over all token × feature "
        "values, averaged over layers) of the FFN output (`output.dense`) and of the "
        "residual sums (inputs of both LayerNorms per layer); *LN-out ch.* = largest / "
        "median per-feature max |x| of the LayerNorm outputs, i.e. how far the widest "
        "channel stretches a per-tensor int8 scale of the GEMM inputs. "
        f"W8A8 = onnxq static QDQ of the exported encoder (`{t0}` target: "
        "per-channel int8 weights, per-tensor minmax activations incl. Q·Kᵀ / P·V, "
        f"{args.cal_batches} × {args.eval_batch} training sequences for calibration; "
        "onnxruntime, exact QDQ arithmetic) followed by the FP MLM head.",
        "",
        "| variant | FP loss / acc | max \\|FFN out\\| | max \\|residual\\| | kurtosis FFN / res. "
        "| LN-out ch. | W8A8 loss / acc | W8A8 top-1 = FP | W8A8 token cos | W8A8 pooled cos |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp, q = r["fp"], r["w8a8"][t0]
        lines.append(
            f"| {VARIANTS[r['method']]} | {fp['loss']:.2f} / {fp['acc']:.3f} | "
            f"{fp['ffn_max']:.1f} ({fp['ffn_batchmax']:.1f}) | {fp['res_max']:.1f} "
            f"({fp['res_batchmax']:.1f}) | {fp['ffn_kurt']:.1f} / {fp['res_kurt']:.1f} | "
            f"{fp['ln_out_chratio']:.1f} | {q['loss']:.2f} / {q['acc']:.3f} | {q['agree']:.3f} | "
            f"{q['token_cos']:.4f} | {q['pooled_cos']:.5f} |")
    for target in args.targets[1:]:
        lines += ["", f"Same models, `{target}` target:", "",
                  "| variant | W8A8 loss / acc | W8A8 top-1 = FP | W8A8 token cos | W8A8 pooled cos |",
                  "|---|---|---|---|---|"]
        for r in rows:
            q = r["w8a8"][target]
            lines.append(f"| {VARIANTS[r['method']]} | {q['loss']:.2f} / {q['acc']:.3f} | "
                         f"{q['agree']:.3f} | {q['token_cos']:.4f} | {q['pooled_cos']:.5f} |")
    lines += ["", "Training curves (held-in batch of the step; max over layers):", ""]
    for r in rows:
        pts = "; ".join(f"{s}: loss {lo:.2f}, \\|FFN\\| {f:.0f}, \\|res\\| {x:.0f}"
                        for s, lo, f, x in r["history"])
        lines.append(f"- {VARIANTS[r['method']]} ({r['secs'] / 60:.1f} min): {pts}")
    lines += ["", f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} "
              f"cores shared with other jobs, 1 thread, torch {torch.__version__}. Command: "
              f"`{command}`."]
    if notes:
        lines += ["", notes]
    return "\n".join(lines)


def _top(fp: dict, corpus: Corpus) -> str:
    pieces = ", ".join(f"`{corpus.pieces[i]}` ×{n}" for i, n in fp["top_pieces"])
    return (f"{fp['delim_share_top']:.0%} [CLS]/[SEP] (vs {fp['delim_share_all']:.0%} of all "
            f"pieces; most frequent {pieces})")


def write_docs(table: str) -> None:
    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = path.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n## Outlier-free training (clipped softmax, gated attention)\n\n"
                + block + "\n")
    path.write_text(text)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="AdamW steps, same for every variant")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024, help="kept pieces incl. 5 specials")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the steps")
    ap.add_argument("--no-decay", dest="decay", action="store_false", help="constant lr after warm-up")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--gamma", type=float, default=-0.025, help="clipped softmax shift γ (ζ = 1)")
    ap.add_argument("--pi-init", type=float, default=0.25, help="initial gate probability")
    ap.add_argument("--sinusoidal-init", type=float, default=0.0,
                    help="initialise the position embeddings as sin/cos × this (0: BERT's N(0, 0.02))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--cal-batches", type=int, default=4)
    ap.add_argument("--targets", default="tensorrt,ort-cpu", help="comma list of onnxq targets")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--only", default="", help="comma list of methods: none,clipped,gated")
    ap.add_argument("--notes", default="", help="extra paragraph for the docs block")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.vocab, seed=args.seed)
    val, cal = eval_batches(corpus, args)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.val)} val sentences, vocab "
          f"{corpus.vocab}, unk {corpus.unk_rate:.1%}, unigram loss {corpus.unigram_loss:.2f}, "
          f"majority acc {corpus.majority_acc:.3f}", flush=True)
    rows = []
    for method in VARIANTS:
        if args.only and method not in args.only.split(","):
            continue
        print(f"{VARIANTS[method]}:", flush=True)
        row = run_variant(method, corpus, val, cal, args, log=lambda s: print(s, flush=True))
        rows.append(row)
        fp = row["fp"]
        qs = "  ".join(f"{t}: loss {q['loss']:.2f} acc {q['acc']:.3f} agree {q['agree']:.3f} "
                       f"tokcos {q['token_cos']:.4f} pooled {q['pooled_cos']:.5f}"
                       for t, q in row["w8a8"].items())
        print(f"  FP loss {fp['loss']:.3f} acc {fp['acc']:.3f} | ffn max {fp['ffn_max']:.1f} "
              f"res max {fp['res_max']:.1f} (attn {fp['res_attn_max']:.1f}, ffn "
              f"{fp['res_ffn_max']:.1f}) ln-out max {fp['ln_out_max']:.1f} | kurt ffn "
              f"{fp['ffn_kurt']:.1f} res {fp['res_kurt']:.1f} ln {fp['ln_out_kurt']:.1f} | ch ratio "
              f"ffn {fp['ffn_chratio']:.1f} res {fp['res_ffn_chratio']:.1f} ln "
              f"{fp['ln_out_chratio']:.1f} | fixed grids {row['grids']}\n"
              f"  attention on [CLS]/[SEP]: mean {fp['sink_mean']:.2f}, most sink-bound head "
              f"{fp['sink_head_max']:.2f} | top-64 residual tokens: {_top(fp, corpus)}\n"
              f"  W8A8 {qs}", flush=True)
    command = "python tools/train_outlier_free.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--notes"))
    table = format_table(rows, corpus, args, command.strip(), args.notes)
    print(table)
    if args.write_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
