"""QAT simulation vs export: the exported QDQ graph computes what the fake-quantized
torch model computes (bit-exact weight / embedding grids, learned scales on the right
tensors), also after fine-tuning moved the scales; training batches mask padding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxq.torch.qat import (  # noqa: E402
    LSQQuantizer,
    QATEmbedding,
    export_qdq,
    fake_quant_rows,
    fake_quant_weight,
    learned_scales,
    prepare_qat,
)

VOCAB = 1024  # 1024 x 64 word table = 65536 elements: stored as int8 rows by the export


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from onnxq.zoo.bert import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("tiny_qat"), hidden=64, layers=2, heads=4,
                         intermediate=256, vocab=VOCAB, outliers=True)


def _near_ties(qmax: int, rows: int = 64, seed: int = 0) -> np.ndarray:
    """Rows whose values sit one float32 ulp beside ``(k + ½) · s``: rounding them in
    float32 and in float64 (numpy's quantizers) disagrees unless done like numpy."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, 2 * qmax + 2), np.float32)
    for r in range(rows):
        amax = np.float32(rng.uniform(0.05, 3.0))
        s = np.float32(np.float64(amax) / qmax)
        ks = np.arange(-qmax, qmax) + 0.5
        vals = (ks * np.float64(s)).astype(np.float32)
        direction = np.where(rng.random(ks.size) < 0.5, -np.inf, np.inf).astype(np.float32)
        vals = np.nextafter(vals, direction)
        out[r, :-2] = vals
        out[r, -2:] = [amax, -amax * np.float32(0.5)]
    return out


def test_fake_quant_weight_is_bit_exact_with_dequantized_export():
    from onnxq.passes.insert_qdq import quantize_weight_blocked_int4, quantize_weight_per_channel

    w4 = np.tile(_near_ties(7, rows=48), (1, 4))[:, :64]  # [out 48, in 64]: one int4 block
    w4 = np.concatenate([w4, w4[:, ::-1]], axis=1)  # in 128: two blocks of 64
    q, s = quantize_weight_blocked_int4(w4.T.copy(), 64)
    ref = (q.astype(np.float32) * np.repeat(s, 64, axis=0)).T
    np.testing.assert_array_equal(fake_quant_weight(torch.from_numpy(w4), 4, 64).numpy(), ref)

    w8 = _near_ties(127, rows=32)
    q, s = quantize_weight_per_channel(w8.T.copy())
    ref = (q.astype(np.float32) * s).T
    np.testing.assert_array_equal(fake_quant_weight(torch.from_numpy(w8), 8).numpy(), ref)


def test_fake_quant_rows_is_bit_exact_with_int8_embedding_tables():
    from onnxq.passes.quantize_embeddings import quantize_rows

    table = _near_ties(127, rows=40, seed=3)
    q, s = quantize_rows(table)
    ref = q.astype(np.float32) * s[:, None]
    np.testing.assert_array_equal(fake_quant_rows(torch.from_numpy(table)).numpy(), ref)


def test_encode_masks_tokenizer_padding_and_keeps_sep(tiny_dir):
    from onnxq.calibration.data import load_tokenizer
    from onnxq.torch.finetune import encode

    tok = load_tokenizer(tiny_dir)
    tok.enable_padding(length=48)  # like all-MiniLM-L6-v2's tokenizer.json (pads to 128)
    sep = tok.token_to_id("[SEP]")
    short, long = "the model", " ".join(["the model reads text"] * 10)
    n_short = len(tok.encode(short).ids) - tok.encode(short).ids.count(tok.padding["pad_id"])
    batch = encode(tok, [short, long], seq_len=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [n_short, 16]
    assert int(batch["input_ids"][0, n_short - 1]) == sep
    assert int(batch["input_ids"][1, 15]) == sep  # truncation keeps the special tokens
    assert tok.padding is not None  # the caller's tokenizer is left alone


def _quantizer_inputs(model, inputs):
    rec: dict[str, np.ndarray] = {}

    def hook(mod, args, out):
        rec.setdefault(mod.tensor, args[0].detach().numpy().copy())  # first use of the tensor

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LSQQuantizer)]
    try:
        with torch.no_grad():
            out = model(**inputs).last_hidden_state.numpy()
    finally:
        for h in hooks:
            h.remove()
    return out, rec


def _pooled(h, mask):
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1.0)


def test_exported_qdq_matches_fake_quant_forward_after_finetuning(tiny_dir):
    from onnxq.calibration import data as _data
    from onnxq.calibration.default_text import calibration_texts, heldout_texts
    from onnxq.calibration.runner import make_session
    from onnxq.passes.insert_qdq import PASS_TAG
    from onnxq.torch.finetune import finetune

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(str(tiny_dir), attn_implementation="eager").eval()
    cal = calibration_texts(48)
    prepare_qat(model, texts=cal, tokenizer=tiny_dir, weight_bits=4, block_size=64,
                batch_size=16, seq_len=32)
    assert model.onnxq_qat.embedding_tables == ("embeddings.word_embeddings.weight",)
    assert isinstance(model.embeddings.word_embeddings, QATEmbedding)
    init = learned_scales(model)
    log = finetune(model, calibration_texts(200), tokenizer=tiny_dir, steps=6, lr=1e-3,
                   scale_lr=0.05, batch_size=8, seq_len=32, warmup=1)
    assert log.steps == 6
    learned = learned_scales(model)
    moved = [abs(learned[t] / init[t] - 1) for t in init]
    assert max(moved) > 0.05, "fine-tuning should move the LSQ scales"

    graph, result = export_qdq(model, texts=cal, tokenizer=tiny_dir)
    assert result.embeddings == ["embeddings.word_embeddings.weight"]
    q_scales = {n.inputs[0].name: float(n.inputs[1].const_value.numpy()) for n in graph.graph
                if n.op_type == "QuantizeLinear" and n.metadata_props.get("onnxq.pass") == PASS_TAG}
    assert set(q_scales) == set(learned)
    for tensor, scale in learned.items():
        assert q_scales[tensor] == scale, tensor

    feeds = list(_data.text_batches(heldout_texts(24), _data.load_tokenizer(tiny_dir),
                                    _data.input_specs(graph), batch_size=12, seq_len=32))
    values = {v.name: v for n in graph.graph for v in n.outputs}
    names = sorted(learned)
    for name in names:  # tap the float tensors that get quantized
        graph.graph.outputs.append(values[name])
    with make_session(graph, optimize=False) as sess:
        out_names = [o.name for o in sess.get_outputs()]
        for feed in feeds:
            got = dict(zip(out_names, sess.run(out_names, feed), strict=True))
            want, taps = _quantizer_inputs(model, {k: torch.from_numpy(v) for k, v in feed.items()})
            for name in names:
                t, o = taps[name], got[name]
                if t.shape != o.shape:  # K is transposed in the graph
                    t = t.swapaxes(-1, -2)
                rel = np.linalg.norm(t - o) / max(np.linalg.norm(o), 1e-12)
                assert rel < 1e-4, (name, rel)
            o = got["last_hidden_state"]
            mask = feed["attention_mask"]
            valid = mask.astype(bool)
            assert np.abs(o - want)[valid].max() < 1e-3
            a, b = _pooled(o, mask), _pooled(want, mask)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cos.min() > 0.9999
