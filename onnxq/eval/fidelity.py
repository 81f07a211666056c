"""Fidelity of a quantized graph against its FP32 original.

For encoders (``last_hidden_state``) the unit of comparison is the sentence
embedding: the attention-masked mean of the token states, as
sentence-transformers pools all-MiniLM-L6-v2. Two numbers summarise it:

* mean cosine similarity between FP32 and INT8 embeddings of the same text;
* neighbour recall@k: for every held-out text, the share of its k nearest
  neighbours (cosine, among the other held-out texts) under FP32 that are also
  among its k nearest under INT8 — what a retrieval user would notice.

For other outputs (``logits``) the cosine of the flattened per-sample outputs
and the top-1 agreement are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Fidelity", "collect_outputs", "fidelity", "neighbour_recall", "pooled"]


@dataclasses.dataclass
class Fidelity:
    """Summary of how closely a quantized model follows FP32."""

    output: str
    samples: int
    mean_cosine: float
    min_cosine: float
    recall_at_10: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return dataclasses.asdict(self)


def pooled(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean over valid tokens of ``[B, S, H]`` states → ``[B, H]``."""
    if mask is None:
        return hidden.mean(axis=1)
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def neighbour_recall(ref: np.ndarray, test: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the k nearest neighbours (excluding self) under ``ref`` and ``test``."""
    n = ref.shape[0]
    if n <= k:
        return float("nan")
    a, b = _normalise(ref), _normalise(test)
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    # stable argsort so ties break by index and results are deterministic
    na = np.argsort(-sa, axis=1, kind="stable")[:, :k]
    nb = np.argsort(-sb, axis=1, kind="stable")[:, :k]
    hits = [len(set(na[i]) & set(nb[i])) for i in range(n)]
    return float(np.mean(hits) / k)


def collect_outputs(
    session, batches: Iterable[Mapping[str, np.ndarray]], output: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run ``session`` over ``batches`` and return per-sample vectors for ``output``.

    ``last_hidden_state``-like rank-3 outputs are mean-pooled with the batch's
    attention mask; other outputs are flattened per sample. The second value is
    the list of raw batch outputs' shapes-independent vectors (unused rows
    removed), kept for callers that need them.
    """
    vecs: list[np.ndarray] = []
    inputs = {i.name for i in session.get_inputs()}
    for feed in batches:
        feed = {k: v for k, v in feed.items() if k in inputs}
        (out,) = session.run([output], feed)
        if out.ndim == 3:
            vecs.append(pooled(out, feed.get("attention_mask")))
        else:
            vecs.append(out.reshape(out.shape[0], -1))
    return np.concatenate(vecs, axis=0), vecs


def fidelity(ref: np.ndarray, test: np.ndarray, *, output: str, k: int = 10) -> Fidelity:
    """Compare per-sample vectors ``test`` against ``ref`` (both ``[N, D]``)."""
    a, b = _normalise(ref), _normalise(test)
    cos = (a * b).sum(axis=1)
    recall = neighbour_recall(ref, test, k) if output != "logits" else None
    top1 = None
    if output == "logits":
        top1 = float(np.mean(ref.argmax(axis=1) == test.argmax(axis=1)))
    if recall is not None and np.isnan(recall):
        recall = None
    return Fidelity(
        output=output,
        samples=int(ref.shape[0]),
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        recall_at_10=recall,
        top1_agreement=top1,
    )


def first_output(names: Sequence[str]) -> str:
    for preferred in ("last_hidden_state", "logits", "sentence_embedding"):
        if preferred in names:
            return preferred
    return names[0]
