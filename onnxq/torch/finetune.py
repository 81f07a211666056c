"""A small distillation loop for quantization-aware fine-tuning of sentence encoders.

The student (a model prepared with :func:`onnxq.torch.qat.prepare_qat`) learns to
reproduce the FP32 teacher's sentence embeddings (attention-masked mean of
``last_hidden_state``, the all-MiniLM-L6-v2 pooling) on plain text:

``loss = (1 − cos(e_s, e_t)) + mse_weight · mean((h_s − h_t)²) / mean(h_t²)``

Weights train with ``lr``, the LSQ scales with ``scale_lr`` (AdamW, no weight decay,
cosine decay after a short warm-up); embedding tables stay frozen unless asked.  Batches
hold real tokens only: the tokenizer's own padding is switched off and padded positions
are masked, exactly like the evaluation batches of :mod:`onnxq.calibration.data`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FinetuneLog", "encode", "finetune", "pooled"]


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _working_tokenizer(tokenizer, seq_len: int):
    """A copy of ``tokenizer`` without padding, truncating to ``seq_len`` (special tokens
    kept), and its pad id.  ``tokenizer.json`` files often pad every text to a fixed
    length; those pad positions must not count as tokens (attention, pooling)."""
    import tokenizers

    if not hasattr(tokenizer, "encode_batch"):
        from onnxq.calibration.data import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    pad_id = int((tokenizer.padding or {}).get("pad_id", 0) or 0)
    work = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    work.no_padding()
    work.enable_truncation(max_length=seq_len)
    return work, pad_id


def encode(tokenizer, texts: Sequence[str], seq_len: int = 128, token_types: bool = True, *,
           _prepared: bool = False, _pad_id: int = 0):
    """Tokenize ``texts`` (truncated to ``seq_len`` tokens, special tokens kept) and pad the
    batch to its longest text; ``attention_mask`` marks the real tokens only, as in
    :func:`onnxq.calibration.data.text_batches` (the held-out evaluation batches).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a folder holding ``tokenizer.json``.
    """
    if _prepared:
        work, pad_id = tokenizer, _pad_id
    else:
        work, pad_id = _working_tokenizer(tokenizer, seq_len)
    ids = [e.ids for e in work.encode_batch(list(texts))]
    width = max(1, max(len(i) for i in ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return batch


@dataclasses.dataclass
class FinetuneLog:
    steps: int
    seconds: float
    losses: list[float]
    cosines: list[float]


def finetune(
    model: nn.Module,
    texts: Sequence[str],
    *,
    tokenizer,
    teacher: nn.Module | None = None,
    steps: int = 200,
    lr: float = 2e-5,
    scale_lr: float = 1e-3,
    batch_size: int = 16,
    seq_len: int = 128,
    mse_weight: float = 1.0,
    warmup: int = 10,
    seed: int = 0,
    time_budget: float | None = None,
    log_every: int = 0,
    train_embeddings: bool = False,
) -> FinetuneLog:
    """Distil ``teacher``'s embeddings into the fake-quantized ``model`` (in place).

    Args:
        model: student (usually prepared with :func:`~onnxq.torch.qat.prepare_qat`).
        texts: training text (e.g. onnxq's calibration text; keep the held-out split out).
        tokenizer: ``tokenizers.Tokenizer`` or folder with ``tokenizer.json``.
        teacher: FP32 reference; default :func:`~onnxq.torch.qat.float_copy` of ``model``
            taken before training.
        steps: optimizer steps.
        lr: learning rate of the weights (and gates, biases, LayerNorms).
        scale_lr: learning rate of the LSQ activation scales.
        batch_size, seq_len: batch shape.
        mse_weight: weight of the relative hidden-state MSE term.
        warmup: linear warm-up steps; cosine decay afterwards.
        time_budget: stop after this many seconds (the cosine decay then follows the
            elapsed share of the budget when that is ahead of the step count).
        log_every: print a line every this many steps (0: silent).
        train_embeddings: also train the embedding tables.  Off by default: AdamW over
            the word table (all-MiniLM-L6-v2: 11.7 M of 22.7 M parameters, dense
            gradients) costs more than the forward and backward passes, and its int8
            rows are close to lossless.
    """
    from onnxq.torch.qat import LSQQuantizer, float_copy

    if teacher is None:
        teacher = float_copy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    frozen = []
    if not train_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.weight.requires_grad:
                m.weight.requires_grad_(False)
                frozen.append(m.weight)
    scale_params = {id(m.scale) for m in model.modules()
                    if isinstance(m, LSQQuantizer) and isinstance(m.scale, nn.Parameter)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in scale_params], "lr": lr},
        {"params": [p for p in params if id(p) in scale_params], "lr": scale_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    token_types = "token_type_ids" in model.forward.__code__.co_varnames
    texts = list(texts)
    work, pad_id = _working_tokenizer(tokenizer, seq_len)
    model.train()
    # no dropout: the teacher is deterministic and the data small
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    losses, cosines = [], []
    start = time.time()
    step = 0
    for step in range(1, steps + 1):
        if step <= warmup:
            factor = step / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            if time_budget:  # anneal by elapsed time too, so that a budget ends at lr ≈ 0
                progress = max(progress, (time.time() - start) / time_budget)
            factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * factor
        batch = encode(work, rng.sample(texts, min(batch_size, len(texts))), seq_len, token_types,
                       _prepared=True, _pad_id=pad_id)
        with torch.no_grad():
            ref = teacher(**batch).last_hidden_state
        out = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        e_s, e_t = pooled(out, mask), pooled(ref, mask)
        cos = F.cosine_similarity(e_s, e_t, dim=-1).mean()
        m = mask.unsqueeze(-1).to(out.dtype)
        mse = (((out - ref) ** 2) * m).sum() / ((ref**2) * m).sum().clamp_min(1e-12)
        loss = (1 - cos) + mse_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        cosines.append(cos.item())
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.5f} cos {cos.item():.5f} "
                  f"({time.time() - start:.0f}s)", flush=True)
        if time_budget is not None and time.time() - start > time_budget:
            break
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    return FinetuneLog(steps=step, seconds=time.time() - start, losses=losses, cosines=cosines)
