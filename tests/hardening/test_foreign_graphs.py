"""Graphs from other exporters: converted, or refused with one line naming the node.

* a legacy TorchScript export (``torch.onnx.export(dynamo=False)``, opset 17) of the
  tiny BERT converts end to end;
* the same graph after onnxruntime's transformer optimizer (fused ``com.microsoft``
  ``Attention``, ``SkipLayerNormalization``, ``EmbedLayerNormalization``, ``BiasGelu``)
  is refused with one line that names the fused operators and a node;
* so is the dynamo export after the optimizer (which fuses SkipLayerNorm/BiasGelu there);
* an already quantized graph is refused as such.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest

from onnxq.support import UnsupportedModelError, check_supported, unsupported_nodes
from onnxq.testing import encoder_block_model

HEADS, HIDDEN = 4, 64


def onnxq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def _one_clear_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("onnxq: error:")
    return lines[0]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxq.zoo import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("fg") / "bert", hidden=HIDDEN, heads=HEADS)


@pytest.fixture(scope="module")
def legacy_onnx(bert_folder):
    """TorchScript (legacy) export, opset 17, written next to tokenizer.json."""
    import torch
    import transformers

    bert = transformers.BertModel.from_pretrained(str(bert_folder)).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids)[0]

    ids = torch.randint(5, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    path = bert_folder / "legacy.onnx"
    axes = {0: "batch", 1: "sequence"}
    try:
        torch.onnx.export(
            Wrapper(bert), (ids, mask, torch.zeros_like(mask)), str(path), dynamo=False,
            opset_version=17, input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes},
        )
    except Exception as exc:  # pragma: no cover - depends on torch/transformers
        pytest.skip(f"legacy exporter cannot export BertModel: {exc!r}")
    return path


def _ort_optimize(src, dest):
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN)
    opt.save_model_to_file(str(dest))
    return dest


@pytest.mark.slow
def test_legacy_torchscript_bert_converts(legacy_onnx, tmp_path):
    out = tmp_path / "legacy.int8.onnx"
    proc = onnxq("convert", str(legacy_onnx), "-o", str(out), "--target", "tensorrt",
                 "--samples", "32", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "legacy.int8.report.json").read_text())
    assert report["coverage"]["fraction"] == 1.0
    assert report["lint"] == []
    assert report["fidelity"]["mean_cosine"] > 0.9


@pytest.mark.slow
def test_ort_optimized_legacy_bert_is_refused(legacy_onnx, tmp_path):
    opt = _ort_optimize(legacy_onnx, legacy_onnx.parent / "legacy_ort_opt.onnx")
    ops = {(n.domain, n.op_type) for n in onnx.load(str(opt)).graph.node}
    fused = {op for dom, op in ops if dom == "com.microsoft"}
    assert fused & {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"}, ops
    out = tmp_path / "o.onnx"
    line = _one_clear_line(onnxq("convert", str(opt), "-o", str(out), "--samples", "16"))
    assert "com.microsoft" in line and "cannot quantize" in line
    assert "(node " in line
    assert any(op in line for op in fused)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.onnx")]


@pytest.mark.slow
def test_ort_optimized_dynamo_bert_is_refused(bert_folder, tmp_path):
    from onnxq.exporters.hf import export_hf

    src = tmp_path / "dynamo.onnx"
    ir.save(export_hf(bert_folder).model, src)
    opt = _ort_optimize(src, tmp_path / "dynamo_opt.onnx")
    model = ir.load(opt)
    bad = unsupported_nodes(model)
    if not bad:  # pragma: no cover - the optimizer fused nothing: it must convert
        proc = onnxq("convert", str(opt), "-o", str(tmp_path / "o.onnx"),
                     "--tokenizer", str(bert_folder), "--samples", "16")
        assert proc.returncode == 0, proc.stderr
        return
    with pytest.raises(UnsupportedModelError) as info:
        check_supported(model)
    message = str(info.value)
    assert "\n" not in message
    assert bad[0].op_type in message and bad[0].domain in message


def test_already_quantized_graph_is_refused(tmp_path):
    model = encoder_block_model()
    graph = model.graph
    first = next(n for n in graph if n.op_type == "MatMul")
    x = first.inputs[0]
    scale = ir.Value(name="s", const_value=ir.tensor(0.1, dtype=ir.DataType.FLOAT),
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    graph.register_initializer(scale)
    q = ir.node("QuantizeLinear", [x, scale], name="preexisting_Q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale], name="preexisting_DQ")
    graph.insert_before(first, [q, dq])
    first.replace_input_with(0, dq.outputs[0])
    with pytest.raises(UnsupportedModelError, match="already quantized.*QuantizeLinear"):
        check_supported(model)
    check_supported(encoder_block_model())  # a plain FP32 graph passes


def test_custom_domain_named_in_one_line():
    model = encoder_block_model()
    graph = model.graph
    gelu = next(n for n in graph if n.op_type == "Gelu")
    fast = ir.node("FastGelu", list(gelu.inputs), domain="com.microsoft", name="FastGelu_7")
    graph.insert_before(gelu, [fast])
    ir.convenience.replace_all_uses_with(gelu.outputs[0], fast.outputs[0])
    graph.remove(gelu, safe=True)
    model.opset_imports["com.microsoft"] = 1
    with pytest.raises(UnsupportedModelError) as info:
        check_supported(model)
    msg = str(info.value)
    assert "com.microsoft FastGelu (node FastGelu_7)" in msg
    assert "\n" not in msg
