"""tools/train_outlier_free.py: data, a few training steps, outlier stats and the W8A8 path."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

_TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "train_outlier_free.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_outlier_free", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def corpus(tool):
    from onnxq.exporters.hf import default_model_dir

    if not (pathlib.Path(default_model_dir()) / "tokenizer.json").is_file():
        pytest.skip("MiniLM tokenizer not installed")
    return tool.load_corpus(vocab=64)


_SMALL = ["--hidden", "32", "--layers", "2", "--heads", "2", "--vocab", "64", "--seq", "24",
          "--batch", "4", "--steps", "3", "--log-every", "3", "--eval-batches", "1",
          "--eval-batch", "4", "--cal-batches", "1", "--sinusoidal-init", "0.05",
          "--targets", "tensorrt"]


def test_corpus_and_batches(tool, corpus):
    assert corpus.vocab == 64 and len(corpus.pieces) == 64
    assert len(corpus.val) > 100 and len(corpus.train) > 9 * len(corpus.val) * 0.9
    assert 0.0 < corpus.unk_rate < 0.6
    assert 0.0 < corpus.majority_acc < 0.5 and 2.0 < corpus.unigram_loss < math.log(64)
    rng = np.random.default_rng(0)
    ids, mask, labels = tool.make_batch(rng, corpus.train, 64, 48, corpus.vocab)
    assert ids.shape == mask.shape == labels.shape == (64, 48)
    assert (ids[:, 0] == tool.CLS).all() and (ids == tool.SEP).sum(1).min() >= 1
    assert ids.min() >= 0 and ids.max() < corpus.vocab and mask.all()
    sel = labels != -100
    # BERT masking: ~15 % of the non-special pieces, never [CLS]/[SEP]; 80 % become [MASK]
    assert 0.10 < sel.mean() < 0.20
    assert (labels[sel] >= tool.N_SPECIAL).sum() + (labels[sel] == tool.UNK).sum() == sel.sum()
    assert 0.7 < (ids[sel] == tool.MASK).mean() < 0.9
    assert (ids[~sel] == tool.MASK).sum() == 0
    # the same generator state gives the same batch (same data for every variant)
    again = tool.make_batch(np.random.default_rng(0), corpus.train, 64, 48, corpus.vocab)
    assert np.array_equal(again[0], ids) and np.array_equal(again[2], labels)


def test_variants_share_init_and_train(tool, corpus):
    args = tool.parse_args(_SMALL)
    torch.set_num_threads(1)
    models = {m: tool.build(m, args, corpus.vocab, 0) for m in ("none", "clipped", "gated")}
    ref = dict(models["none"].named_parameters())
    for m in ("clipped", "gated"):
        for name, p in models[m].named_parameters():
            if name in ref:
                assert torch.equal(p, ref[name]), (m, name)
    assert any("onnxq_gate" in n for n, _ in models["gated"].named_parameters())
    secs, history = tool.train(models["none"], corpus, args, 0, log=lambda s: None)
    assert [h[0] for h in history] == [3]
    assert all(math.isfinite(v) for v in history[0][1:])


def test_clipped_variant_end_to_end(tool, corpus):
    """Train a few steps, measure outliers, export, quantize: finite metrics and the
    clipped-softmax output on the fixed [0, 1] int8 grid (scale 1/127)."""
    args = tool.parse_args(_SMALL)
    torch.set_num_threads(1)
    val, cal = tool.eval_batches(corpus, args)
    row = tool.run_variant("clipped", corpus, val, cal, args, log=lambda s: None)
    fp, q = row["fp"], row["w8a8"]["tensorrt"]
    for key in ("loss", "acc", "ffn_max", "res_max", "ffn_kurt", "res_kurt", "ln_out_chratio"):
        assert math.isfinite(fp[key]), key
    assert fp["n_masked"] > 0 and 0.0 <= fp["acc"] <= 1.0
    assert fp["res_max"] >= fp["res_ffn_max"] > 0 and fp["ffn_kurt"] > 1.0
    grids = row["grids"]["tensorrt"]
    assert len(grids) == args.layers  # one P·V input per layer
    assert all(s == pytest.approx(1 / 127) for s in grids)
    for key in ("loss", "acc", "agree", "token_cos", "pooled_cos"):
        assert math.isfinite(q[key]), key
    assert 0.9 < q["token_cos"] <= 1.0 + 1e-6 and 0.5 <= q["agree"] <= 1.0
    table = tool.format_table([row], corpus, args, "python tools/train_outlier_free.py")
    assert "| clipped softmax |" in table and "python tools/train_outlier_free.py" in table
