"""Tests for onnxq.exporters.decoder (causal LMs with KV cache), onnxq.runtime and the decoder zoo."""

from __future__ import annotations

import json
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

from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.exporters.decoder import export_decoder, kv_input_names, kv_output_names  # noqa: E402
from onnxq.runtime import DecoderSession, generate, teacher_forced_logits  # noqa: E402
from onnxq.zoo.decoders import (  # noqa: E402
    BOS_TOKEN_ID,
    MASSIVE_CHANNELS,
    ffn_outlier_channel,
    tiny_decoder_dir,
    tiny_decoder_onnx,
    tiny_llama_dir,
)

LINEAR_PATH = re.compile(
    r"^model\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|decoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2))$|^lm_head$"
)
PROMPT = np.array([BOS_TOKEN_ID, 17, 42, 99, 5, 230, 64, 128, 77], dtype=np.int64)


def _torch_model(folder: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(np.atleast_2d(ids)), **kwargs).logits.numpy()


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("llama") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def llama_export(llama_dir: pathlib.Path):
    return export_decoder(llama_dir)


@pytest.fixture(scope="module")
def llama_session(llama_export) -> DecoderSession:
    return DecoderSession(llama_export.model)


@pytest.fixture(scope="module")
def llama_torch(llama_dir: pathlib.Path):
    return _torch_model(llama_dir)


# --------------------------------------------------------------------------- graph contract


def test_optimum_names_and_metadata(llama_export, llama_dir: pathlib.Path) -> None:
    model = llama_export.model
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *kv_input_names(2)]
    assert outputs == ["logits", *kv_output_names(2)]
    assert kv_input_names(2)[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[1:3] == ["present.0.key", "present.0.value"]
    assert llama_export.input_names == inputs and llama_export.output_names == outputs
    assert llama_export.task == "text-generation"
    assert llama_export.max_abs_diff < 1e-4
    props = model.metadata_props
    assert props["onnxq.task"] == "text-generation"
    assert props["onnxq.model_type"] == "llama"
    assert (props["onnxq.num_layers"], props["onnxq.num_heads"]) == ("2", "4")
    assert (props["onnxq.num_kv_heads"], props["onnxq.head_dim"]) == ("2", "16")
    assert pathlib.Path(props["onnxq.tokenizer"]) == llama_dir.resolve()
    assert (pathlib.Path(props["onnxq.tokenizer"]) / "tokenizer.json").is_file()
    # Dynamic axes: batch, sequence, past_sequence (may be 0) and the total for the mask.
    past = model.graph.inputs[3].shape
    assert [str(d) for d in past] == ["batch", "2", "past_sequence", "16"]
    assert [str(d) for d in model.graph.inputs[1].shape] == ["batch", "total_sequence"]


def test_module_metadata_on_linears(llama_export) -> None:
    model = llama_export.model
    initializers = set(model.graph.initializers)
    modules = set()
    for node in model.graph:
        assert "onnxq.module" in node.metadata_props
        if node.op_type == "MatMul" and node.inputs[1].name in initializers:
            module = node.metadata_props["onnxq.module"]
            assert LINEAR_PATH.match(module), module
            assert node.metadata_props["onnxq.module_type"] == "Linear"
            assert node.inputs[1].name == f"{module}.weight"
            modules.add(module)
    expected = {
        f"model.layers.{i}.{name}"
        for i in range(2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert modules == expected | {"lm_head"}
    # MatMul weights are stored [in, out]; GQA shows in k/v_proj widths.
    assert model.graph.initializers["model.layers.0.self_attn.k_proj.weight"].shape == ir.Shape([64, 32])
    assert model.graph.initializers["model.layers.0.self_attn.q_proj.weight"].shape == ir.Shape([64, 64])


# --------------------------------------------------------------------------- numerics


def test_empty_past_prefill_and_gqa_present_shapes(llama_session: DecoderSession, llama_torch) -> None:
    session = llama_session
    feeds = {
        "input_ids": PROMPT[None],
        "attention_mask": np.ones((1, PROMPT.size), np.int64),
        "position_ids": np.arange(PROMPT.size, dtype=np.int64)[None],
    }
    for name in kv_input_names(2):
        feeds[name] = np.zeros((1, 2, 0, 16), np.float32)
    outs = session.session.run(None, feeds)
    assert _rel_err(outs[0], _torch_logits(llama_torch, PROMPT)) <= 1e-4
    for present in outs[1:]:
        assert present.shape == (1, 2, PROMPT.size, 16)  # num_kv_heads = 2, not 4

    logits = session.prefill(np.stack([PROMPT, PROMPT[::-1]]))
    assert logits.shape == (2, PROMPT.size, 256)
    assert all(v.shape == (2, 2, PROMPT.size, 16) for v in session.past.values())
    session.step(np.array([3, 4]))
    assert session.past_length == PROMPT.size + 1
    assert all(v.shape == (2, 2, PROMPT.size + 1, 16) for v in session.past.values())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "opt"])
def test_prefill_and_16_decode_steps_match_torch(
    kind: str, llama_dir: pathlib.Path, llama_session: DecoderSession, tmp_path: pathlib.Path
) -> None:
    if kind == "llama":
        folder, session = llama_dir, llama_session
    else:
        path = tiny_decoder_onnx(kind, tmp_path / kind, seed=3)
        folder, session = path.parent, DecoderSession(path)
        assert ir.load(path).metadata_props["onnxq.model_type"] == kind
    rng = np.random.default_rng(0)
    ids = np.concatenate([[BOS_TOKEN_ID], rng.integers(3, 256, size=23)]).astype(np.int64)
    got = teacher_forced_logits(session, ids, prefill_len=8)  # prefill 8, then 16 decode steps
    assert got.shape == (17, 256)
    want = _torch_logits(_torch_model(folder), ids)[0, 7:]
    assert _rel_err(got, want) <= 1e-4
    # Batched and left-padded: the runtime builds mask and positions like generate().
    batch = np.stack([ids[:12], np.concatenate([[0, 0, 0], ids[:9]])])
    mask = (np.arange(12) >= np.array([[0], [3]])).astype(np.int64)
    logits = session.prefill(batch, mask)
    steps = [session.step(batch[:, -1])[:, -1] for _ in range(2)]
    torch_model = _torch_model(folder)
    full = np.concatenate([batch, batch[:, -1:], batch[:, -1:]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 2), np.int64)], axis=1)
    with torch.no_grad():
        pos = torch.from_numpy(np.where(full_mask == 0, 1, np.cumsum(full_mask, 1) - 1))
        want = torch_model(
            torch.from_numpy(full), attention_mask=torch.from_numpy(full_mask), position_ids=pos
        ).logits.numpy()
    assert _rel_err(logits[mask == 1], want[:, :12][mask == 1]) <= 1e-4
    assert _rel_err(np.stack(steps, 1), want[:, 12:]) <= 1e-4


def test_greedy_generation_matches_torch(llama_session: DecoderSession, llama_torch) -> None:
    ids = np.stack([PROMPT, np.concatenate([[0, 0], PROMPT[:7]])])
    mask = (ids != 0).astype(np.int64)
    mask[0] = 1
    with torch.no_grad():
        want = llama_torch.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=24,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        ).numpy()
    got = generate(llama_session, ids, 24, attention_mask=mask)
    np.testing.assert_array_equal(got, want)
    # The single-sequence form, with an EOS that is never produced, gives the same row.
    single = generate(llama_session, PROMPT, 24, eos_token_id=255)
    if 255 not in want[0, PROMPT.size :]:
        np.testing.assert_array_equal(single, want[:1])


def test_generate_stops_at_eos(llama_session: DecoderSession) -> None:
    first = generate(llama_session, PROMPT, 6)[0, PROMPT.size :]
    eos = int(first[2])
    stop = int(np.argmax(first == eos))
    out = generate(llama_session, PROMPT, 6, eos_token_id=eos)[0, PROMPT.size :]
    np.testing.assert_array_equal(out, first[: stop + 1])


# --------------------------------------------------------------------------- planted outliers


def _tap(model: ir.Model, values: dict[str, ir.Value], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` with extra outputs on ``values``, then remove them again."""
    graph = model.graph
    before = list(graph.outputs)
    graph.outputs.extend(v for v in values.values() if v not in before)
    try:
        data = ir.serde.serialize_model(model).SerializeToString()
    finally:
        graph.outputs[:] = before
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    result = session.run([v.name for v in values.values()], feeds)
    return dict(zip(values, result))


def test_planted_massive_activations_visible(llama_export) -> None:
    model = llama_export.model
    by_module: dict[str, ir.Node] = {}
    for node in model.graph:
        by_module.setdefault(node.metadata_props["onnxq.module"] + ":" + node.op_type, node)
    residual = by_module["model.layers.1.input_layernorm:Pow"].inputs[0]  # after layer 0
    down_in = by_module["model.layers.1.mlp.down_proj:MatMul"].inputs[0]
    ids = PROMPT[None]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
        **{name: np.zeros((1, 2, 0, 16), np.float32) for name in kv_input_names(2)},
    }
    got = _tap(model, {"residual": residual, "down_in": down_in}, feeds)
    h = got["residual"][0]  # [sequence, hidden]
    median = float(np.median(np.abs(h)))
    big, neg = MASSIVE_CHANNELS
    assert h[0, big] > 80 * median and h[0, neg] < -40 * median  # BOS only
    assert np.abs(h[1:]).max() < 15 * median
    x = got["down_in"][0]  # [sequence, intermediate]
    channel = ffn_outlier_channel(1, x.shape[-1])
    per_channel = np.abs(x[1:]).max(axis=0)
    assert int(per_channel.argmax()) == channel
    assert per_channel[channel] > 50 * float(np.median(np.abs(x)))


def test_zoo_is_deterministic_and_has_a_tokenizer(tmp_path: pathlib.Path) -> None:
    from tokenizers import Tokenizer

    a = tiny_decoder_dir("qwen2", tmp_path / "a", seed=5)
    b = tiny_decoder_dir("qwen2", tmp_path / "b", seed=5)
    c = tiny_decoder_dir("qwen2", tmp_path / "c", seed=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    model = _torch_model(a)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: q/k/v biases
    encoding = Tokenizer.from_file(str(a / "tokenizer.json")).encode("the water is warm")
    assert encoding.ids[0] == BOS_TOKEN_ID and 3 not in encoding.ids[1:]  # no <unk>


def test_unsupported_model_type(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(OnnxqError, match="unsupported model type 'gpt2'"):
        export_decoder(tmp_path)
