"""Tiny random causal language models (LLaMA, Qwen2, Qwen3, OPT) with LLM-like outliers.

Each builder writes a Hugging Face folder (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``) small enough to export in seconds:
hidden size 64, 2 layers, 4 attention heads (2 key/value heads with grouped-query
attention), vocabulary 256.  The weights are random but scaled like a trained model
(every linear layer ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``), so the logits spread
widely enough that greedy decoding is not decided by rounding noise.

With ``outliers=True`` the models carry the two outlier kinds that make static INT8
quantization of real LLMs hard:

* **massive activations** (Sun et al., 2024): on the BOS token, the residual stream has
  two huge channels, :data:`MASSIVE_CHANNELS` -- about +100 and -60 against a median
  magnitude of about 0.9 (about 100x).  As in real models they are written by the MLP of the first
  layer: the BOS embedding has a distinctive value in channel ``MASSIVE_CHANNELS[0]``
  (zero for every other token), one FFN channel of layer 0 (:func:`massive_ffn_channel`)
  fires only on that direction, and its ``down_proj`` (``fc2`` for OPT) column writes the
  huge values, which the residual stream then carries through every later layer.  The
  ``down_proj`` input therefore also has a huge value, on BOS only;
* **channel outliers in the down-projection input**: residual channel 29 holds the same
  value (2.0) in every token embedding, and in every layer one FFN channel
  (:func:`ffn_outlier_channel`) reads it through large gate and up weights (OPT: ``fc1``),
  so on every token that channel reaches about 100 at the ``down_proj`` input (several
  hundred times the median; OPT, with ReLU, less).  Its ``down_proj`` column is scaled
  down so the residual stream of ordinary tokens stays moderate.

torch and transformers are imported only inside the functions.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

__all__ = [
    "BOS_TOKEN_ID",
    "DECODER_KINDS",
    "EOS_TOKEN_ID",
    "MASSIVE_CHANNELS",
    "PAD_TOKEN_ID",
    "ffn_outlier_channel",
    "massive_ffn_channel",
    "tiny_decoder_dir",
    "tiny_decoder_onnx",
    "tiny_llama_dir",
    "tiny_opt_dir",
    "tiny_qwen_dir",
]

DECODER_KINDS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "opt")
"""Model kinds :func:`tiny_decoder_dir` and :func:`tiny_decoder_onnx` build."""

MASSIVE_CHANNELS: tuple[int, ...] = (13, 41)
"""Residual-stream channels with massive activations on the BOS token (+ and -)."""

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
_UNK_TOKEN = "<unk>"
_SPECIALS = ("<pad>", "<s>", "</s>", _UNK_TOKEN)

_MAX_POSITIONS = 256
# Sizes of the planted outliers (see the module docstring).
_BOS_EMBED = 8.0  # BOS embedding value in MASSIVE_CHANNELS[0]
_MASSIVE_GAIN = 1.5  # gate/up (fc1) weight on that channel for the massive FFN channel
_MASSIVE_WRITE = (1.6, -1.0)  # down_proj weights into MASSIVE_CHANNELS
_FFN_OUTLIER_GAIN = 4.0  # gate/up (fc1) weight on the constant channel for the FFN outlier
_CONSTANT_CHANNEL = 29  # residual channel with the same value on every token
_CONSTANT_VALUE = 2.0


def ffn_outlier_channel(layer: int, intermediate: int) -> int:
    """The FFN channel that carries the per-token outlier into ``down_proj`` in ``layer``."""
    return (11 + 17 * layer) % intermediate


def massive_ffn_channel(intermediate: int) -> int:
    """The FFN channel of layer 0 that writes the massive activations on BOS."""
    return (5 + intermediate // 2) % intermediate


# --------------------------------------------------------------------------- tokenizer


def _write_tokenizer(folder: pathlib.Path, vocab_size: int, model_type: str) -> None:
    """A word-piece tokenizer over the BERT zoo vocabulary, with LLM special tokens.

    Encoding prepends ``<s>`` (id 1), as LLaMA's tokenizer does; ``</s>`` (id 2) is EOS.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from onnxq.zoo.bert import _vocabulary

    # The BERT vocabulary starts with its five special tokens; keep its regular tokens.
    regular = _vocabulary(vocab_size + 1)[5:]
    vocab = [*_SPECIALS, *regular][:vocab_size]
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token=_UNK_TOKEN, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(_SPECIALS))
    tokenizer.enable_truncation(max_length=_MAX_POSITIONS)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _MAX_POSITIONS,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": _UNK_TOKEN,
        "add_bos_token": True,
        "padding_side": "left",
        "model_type": model_type,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------- weights


def _reinit(model: Any, generator: Any, embedding_std: float = 1.0) -> None:
    """Trained-model scales: linears N(0, 1/fan_in), embeddings N(0, 1), norms near 1."""
    import torch

    for name, param in model.named_parameters():
        if param.ndim == 2 and "embed" in name:
            param.copy_(embedding_std * torch.randn(param.shape, generator=generator))
        elif param.ndim == 2:
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
        elif name.endswith(".bias"):
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        elif name.endswith(".weight"):  # RMSNorm / LayerNorm gamma
            param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))


def _plant_rms_outliers(model: Any) -> None:
    """Massive activations and down_proj input outliers for a LLaMA-style (SwiGLU) model."""
    embed = model.model.embed_tokens.weight
    big, neg = MASSIVE_CHANNELS
    embed[:, big] = 0.0
    embed[BOS_TOKEN_ID, big] = _BOS_EMBED
    layers = model.model.layers
    intermediate = layers[0].mlp.gate_proj.out_features
    j = massive_ffn_channel(intermediate)
    mlp = layers[0].mlp
    # RMSNorm of the BOS token makes channel `big` about sqrt(hidden); gate and up both
    # read it, so SiLU(gate) * up grows with its square.
    gamma = layers[0].post_attention_layernorm.weight
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[j] = 0.0
        proj.weight[j, big] = _MASSIVE_GAIN / float(gamma[big])
    mlp.down_proj.weight[:, j] = 0.0
    mlp.down_proj.weight[big, j] = _MASSIVE_WRITE[0]
    mlp.down_proj.weight[neg, j] = _MASSIVE_WRITE[1]
    # A near-constant residual channel (trained LLMs have a few) drives one FFN channel
    # per layer hard on every token: a per-channel outlier at the down_proj input.
    embed[:, _CONSTANT_CHANNEL] = _CONSTANT_VALUE
    for index, layer in enumerate(layers):
        k = ffn_outlier_channel(index, intermediate)
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[k, _CONSTANT_CHANNEL] = _FFN_OUTLIER_GAIN
        # Keep what the channel writes into the residual stream at the usual size.
        layer.mlp.down_proj.weight[:, k] /= _FFN_OUTLIER_GAIN**2


def _plant_opt_outliers(model: Any) -> None:
    """The same outliers for OPT (pre-LayerNorm, biases, ReLU FFN)."""
    decoder = model.model.decoder
    embed = decoder.embed_tokens.weight
    big, neg = MASSIVE_CHANNELS
    embed[:, big] = 0.0
    embed[BOS_TOKEN_ID, big] = _BOS_EMBED
    decoder.embed_positions.weight[:, big] = 0.0
    layers = decoder.layers
    intermediate = layers[0].fc1.out_features
    j = massive_ffn_channel(intermediate)
    first = layers[0]
    gamma = first.final_layer_norm.weight
    # LayerNorm of BOS puts about sqrt(hidden) into channel `big`, of other tokens about
    # zero; the negative bias keeps ReLU closed for them.
    first.fc1.weight[j] = 0.0
    gain = 16.0 * _MASSIVE_GAIN
    first.fc1.weight[j] = 0.0
    first.fc1.weight[j, big] = gain / float(gamma[big])
    first.fc1.bias[j] = -gain / 2 - gain * float(first.final_layer_norm.bias[big]) / float(gamma[big])
    first.fc2.weight[:, j] = 0.0
    first.fc2.weight[big, j] = _MASSIVE_WRITE[0]
    first.fc2.weight[neg, j] = _MASSIVE_WRITE[1]
    embed[:, _CONSTANT_CHANNEL] = _CONSTANT_VALUE
    decoder.embed_positions.weight[:, _CONSTANT_CHANNEL] = 0.0
    for index, layer in enumerate(layers):
        k = ffn_outlier_channel(index, intermediate)
        layer.fc1.weight[k, _CONSTANT_CHANNEL] = 2.0 * _FFN_OUTLIER_GAIN
        layer.fc1.bias[k] = 0.0
        layer.fc2.weight[:, k] /= 4.0 * _FFN_OUTLIER_GAIN

# --------------------------------------------------------------------------- builders


def _config(kind: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> Any:
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    if kind == "llama":
        return transformers.LlamaConfig(
            intermediate_size=intermediate, num_key_value_heads=kv_heads,
            tie_word_embeddings=False, rms_norm_eps=1e-6, **common,
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(
            intermediate_size=intermediate, num_key_value_heads=kv_heads,
            tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False, **common,
        )
    if kind == "qwen3":
        return transformers.Qwen3Config(
            intermediate_size=intermediate, num_key_value_heads=kv_heads, head_dim=hidden // heads,
            tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False, **common,
        )
    if kind == "opt":
        common.pop("num_hidden_layers")
        common.pop("num_attention_heads")
        return transformers.OPTConfig(
            num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=intermediate,
            word_embed_proj_dim=hidden, do_layer_norm_before=True, activation_function="relu",
            enable_bias=True, tie_word_embeddings=False, dropout=0.0, attention_dropout=0.0,
            **common,
        )
    raise ValueError(f"unknown decoder kind {kind!r}; expected one of {', '.join(DECODER_KINDS)}")


def tiny_decoder_dir(
    kind: str,
    dest: os.PathLike[str] | str,
    *,
    seed: int = 0,
    gqa: bool = True,
    outliers: bool = True,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 256,
) -> pathlib.Path:
    """Write a tiny random ``*ForCausalLM`` of ``kind`` as a Hugging Face folder.

    Args:
        kind: ``"llama"``, ``"qwen2"`` (q/k/v biases), ``"qwen3"`` (q/k RMSNorm) or ``"opt"``.
        dest: Folder to write into (created if missing).
        seed: Random seed; the same arguments give identical weights.
        gqa: Use ``heads // 2`` key/value heads (grouped-query attention).  OPT has no
            GQA and ignores it.
        outliers: Plant massive activations and down_proj input outliers.
        hidden, layers, heads, intermediate, vocab: Model sizes.

    Returns:
        The folder path.
    """
    import torch
    import transformers

    kv_heads = max(1, heads // 2) if gqa and kind != "opt" else heads
    config = _config(kind, hidden, layers, heads, kv_heads, intermediate, vocab)
    folder = pathlib.Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        _reinit(model, generator)
        if outliers:
            if kind == "opt":
                _plant_opt_outliers(model)
            else:
                _plant_rms_outliers(model)
    model.generation_config.do_sample = False
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    logging_ = transformers.utils.logging
    bars = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            logging_.enable_progress_bar()
    _write_tokenizer(folder, vocab, config.model_type)
    return folder


def tiny_llama_dir(dest: os.PathLike[str] | str, *, seed: int = 0, gqa: bool = True, outliers: bool = True, **kw: Any) -> pathlib.Path:
    """A tiny random ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, GQA); see :func:`tiny_decoder_dir`."""
    return tiny_decoder_dir("llama", dest, seed=seed, gqa=gqa, outliers=outliers, **kw)


def tiny_qwen_dir(
    dest: os.PathLike[str] | str, *, version: int = 2, seed: int = 0, gqa: bool = True, outliers: bool = True, **kw: Any
) -> pathlib.Path:
    """A tiny random Qwen2 (``version=2``, q/k/v biases) or Qwen3 (``version=3``, q/k norms) causal LM."""
    if version not in (2, 3):
        raise ValueError(f"Qwen version must be 2 or 3, got {version!r}")
    return tiny_decoder_dir(f"qwen{version}", dest, seed=seed, gqa=gqa, outliers=outliers, **kw)


def tiny_opt_dir(dest: os.PathLike[str] | str, *, seed: int = 0, outliers: bool = True, **kw: Any) -> pathlib.Path:
    """A tiny random ``OPTForCausalLM`` (pre-LayerNorm, biases, ReLU FFN, learned positions)."""
    kw.pop("gqa", None)
    return tiny_decoder_dir("opt", dest, seed=seed, gqa=False, outliers=outliers, **kw)


def tiny_decoder_onnx(kind: str, dest_dir: os.PathLike[str] | str, *, opset: int = 21, **kw: Any) -> pathlib.Path:
    """Build a tiny decoder folder with :func:`tiny_decoder_dir` and export it to ``model.onnx``.

    Args:
        kind: One of :data:`DECODER_KINDS`.
        dest_dir: Folder for the Hugging Face files and ``model.onnx`` (single file).
        opset: ONNX opset.
        **kw: Passed to :func:`tiny_decoder_dir`.

    Returns:
        Path of the written ``model.onnx``.
    """
    import onnx_ir as ir

    from onnxq.exporters.decoder import export_decoder

    folder = tiny_decoder_dir(kind, dest_dir, **kw)
    result = export_decoder(folder, opset=opset)
    path = folder / "model.onnx"
    ir.save(result.model, path)
    return path
