"""Tiny random transformer models for tests and benchmarks.

The models are small enough to build and export in seconds, yet shaped like the real
thing: a BERT encoder with a WordPiece ``tokenizer.json`` (so the tokenizer code path is
the same as for downloaded models) and, optionally, the structured activation outliers
that trained BERTs show and that make static INT8 quantization hard:

* residual stream: every LayerNorm (embeddings, attention output, layer output) gives
  channel 7 a large positive offset and a larger gamma, and channel 3 a smaller negative
  one, so the hidden states carry a few huge, one-signed channels.  As in
  all-MiniLM-L6-v2, the attention-output LayerNorm (the input of ``fc1``) has the largest
  ones, 15-30x the median channel; the layer-output LayerNorm about 10-20x;
* FFN: one intermediate channel per layer has its ``fc1`` row and bias raised so that its
  GELU output reaches about 25 while the others stay below 4 (the outlier that hits the
  input of the FFN down-projection).

torch and transformers are imported only inside the functions.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

__all__ = ["OUTLIER_CHANNELS", "ffn_outlier_channel", "tiny_bert_dir", "tiny_bert_onnx"]

OUTLIER_CHANNELS: tuple[int, ...] = (7, 3)
"""Hidden channels that carry planted residual-stream outliers (the first is the strongest)."""

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_MAX_POSITIONS = 128

_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green quick develop ocean warm free minute strong special mind behind clear tail produce
fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder
laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among
"""

_SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "ion", "tion", "ment", "ness", "able", "ful", "less")


def _vocabulary(size: int) -> list[str]:
    """A deterministic WordPiece vocabulary of exactly ``size`` tokens."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punctuation = list(".,!?'\"-:;()")
    base = [*_SPECIAL_TOKENS, *letters, *digits, *punctuation]
    base += ["##" + t for t in letters + digits]
    if size < len(base):
        raise ValueError(f"vocab must be at least {len(base)} tokens, got {size}")
    tokens = list(base)
    seen = set(tokens)

    def extend(candidates: list[str]) -> None:
        for token in candidates:
            if len(tokens) >= size:
                return
            if token not in seen:
                seen.add(token)
                tokens.append(token)

    extend(["##" + s for s in _SUFFIXES])
    extend(_WORDS.split())
    bigrams = [a + b for a in letters for b in letters]
    extend(["##" + b for b in bigrams])
    extend(bigrams)
    extend([a + b + c for a in letters for b in letters for c in letters])
    if len(tokens) < size:
        raise ValueError(f"vocab of {size} tokens is larger than this generator supports")
    return tokens


def _write_tokenizer(folder: pathlib.Path, vocab: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    tokenizer.enable_truncation(max_length=_MAX_POSITIONS)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": _MAX_POSITIONS,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def ffn_outlier_channel(layer: int, intermediate: int) -> int:
    """The intermediate (FFN) channel that carries the planted outlier in ``layer``.

    Args:
        layer: Encoder layer index.
        intermediate: FFN width.

    Returns:
        The channel index.
    """
    return (11 + 17 * layer) % intermediate


def _perturb(model: Any, generator: Any) -> None:
    """Give LayerNorm and bias parameters non-trivial values, like a trained model.

    Without this every bias is zero and every gamma one, and the exporter's optimizer
    merges all those identical tensors into a few shared initializers.
    """
    import torch

    for name, param in model.named_parameters():
        if name.endswith("LayerNorm.weight"):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        elif name.endswith(".bias"):
            param.add_(0.02 * torch.randn(param.shape, generator=generator))


def _plant_outliers(encoder_model: Any, hidden: int, intermediate: int) -> None:
    """Plant BERT-like outlier channels (see the module docstring).

    Each LayerNorm writes a large, one-signed offset into an outlier channel through its
    beta, and the bias of the dense layer that feeds the next residual add takes most of
    it out again.  That is how trained BERTs keep huge channels without squashing the
    others: the LayerNorm inputs stay moderate, so the other channels keep a spread of
    about one.  Sizes follow all-MiniLM-L6-v2, where the attention-output LayerNorm
    reaches about 28 in channel 99 (median channel about 1.1) and the output LayerNorm
    about 8 to 10.
    """
    import torch

    strong, weak = OUTLIER_CHANNELS
    # (gamma factor, beta offset) for the strong and the weak channel.
    emb_plan = {strong: (2.0, 3.0), weak: (1.0, 0.0)}
    attn_plan = {strong: (1.5, 24.0), weak: (1.5, -8.0)}
    out_plan = {strong: (1.0, 8.0), weak: (1.0, -3.0)}

    def plant(ln: Any, plan: dict[int, tuple[float, float]]) -> None:
        for channel, (gain, offset) in plan.items():
            if channel < hidden:
                ln.weight[channel] *= gain
                ln.bias[channel] += offset

    def cancel(dense: Any, plan: dict[int, tuple[float, float]]) -> None:
        for channel, (_, offset) in plan.items():
            if channel < hidden:
                dense.bias[channel] -= offset

    plant(encoder_model.embeddings.LayerNorm, emb_plan)
    previous = emb_plan
    for index, layer in enumerate(encoder_model.encoder.layer):
        cancel(layer.attention.output.dense, previous)
        plant(layer.attention.output.LayerNorm, attn_plan)
        cancel(layer.output.dense, attn_plan)
        plant(layer.output.LayerNorm, out_plan)
        previous = out_plan
        fc1 = layer.intermediate.dense
        channel = ffn_outlier_channel(index, intermediate)
        fc1.weight[channel] *= 4.0
        fc1.bias[channel] = torch.tensor(22.0)


def tiny_bert_dir(
    dest: os.PathLike[str] | str,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 512,
    outliers: bool = True,
    classification: bool = False,
) -> pathlib.Path:
    """Write a tiny random BERT as a Hugging Face folder (safetensors + tokenizer.json).

    Args:
        dest: Folder to write into (created if missing).
        seed: Random seed; the same arguments give byte-identical files.
        hidden: Hidden size.
        layers: Number of encoder layers.
        heads: Number of attention heads.
        intermediate: FFN width.
        vocab: Vocabulary size (at least 87).
        outliers: Plant BERT-like activation outliers.
        classification: Save a ``BertForSequenceClassification`` with two labels instead of
            a ``BertModel``.

    Returns:
        The folder path.
    """
    import torch
    import transformers

    folder = pathlib.Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _vocabulary(vocab)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=_MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model_class = transformers.BertForSequenceClassification if classification else transformers.BertModel
    model = model_class(config).eval()
    with torch.no_grad():
        _perturb(model, generator)
        if outliers:
            _plant_outliers(model.base_model, hidden, intermediate)
    transformers_logging = transformers.utils.logging
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    _write_tokenizer(folder, tokens)
    return folder


def tiny_bert_onnx(
    dest_dir: os.PathLike[str] | str, *, task: str = "auto", opset: int = 21, **kw: Any
) -> pathlib.Path:
    """Build a tiny BERT folder with :func:`tiny_bert_dir` and export it to ``model.onnx``.

    Args:
        dest_dir: Folder for the Hugging Face files and ``model.onnx`` (single file).
        task: Export task, see :func:`onnxq.exporters.export_hf`.
        opset: ONNX opset.
        **kw: Passed to :func:`tiny_bert_dir`.

    Returns:
        Path of the written ``model.onnx``.
    """
    import onnx_ir as ir

    from onnxq.exporters.hf import export_hf

    folder = tiny_bert_dir(dest_dir, **kw)
    result = export_hf(folder, task=task, opset=opset)
    path = folder / "model.onnx"
    ir.save(result.model, path)
    return path
